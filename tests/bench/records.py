"""Hand-made cell records and run directories with known answers, for report, select and export tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bench.results import RUN, SCHEMA_VERSION, append_record, write_json_atomic
from bench.stats import summarize


def spread(p50: float, rel: float, n: int = 5) -> list[float]:
    """n samples with median p50 whose min..max spans p50 * (1 +- rel) (the CI of the median at n=5)."""
    if n == 1:
        return [p50]
    return [p50 * (1 + rel * (2 * i / (n - 1) - 1)) for i in range(n)]


def record(variant: str, decode: float | None = 100.0, noise: float = 0.02, kld: float | None = 0.01,
           status: str = "ok", error: str | None = None, model: str = "tiny", device: str = "cpu",
           scenario: dict | None = None, peak_mib: float = 400.0, steps: int = 1, reps: int = 5,
           **extra_metrics) -> dict:
    """A record as a real run writes it: latency summaries from samples, decode rate with its summary."""
    scenario = scenario or {"name": "generate", "batch_size": 1, "prompt_tokens": 128, "new_tokens": 32}
    cid = hashlib.sha256(json.dumps([variant, model, device, scenario], sort_keys=True).encode()).hexdigest()[:16]
    rec = {"schema_version": SCHEMA_VERSION, "cell_id": cid, "model": model, "variant": variant,
           "recipe": {"name": variant, "steps": [{"technique": "x"}] * steps}, "device": device,
           "scenario": dict(scenario), "status": status, "error": error, "metrics": {}, "samples": {},
           "method": {"clock": "perf_counter_ns", "repeat": {"warmup": 1, "min_reps": 5, "budget_s": 0.5}},
           "labels": [], "timing_s": {}}
    if status != "ok":
        rec["error"] = error or f"{variant} {status}"
        return rec
    m, s = rec["metrics"], rec["samples"]
    if decode is not None:
        rates = spread(decode, noise, reps)
        tpot = [1e3 / r for r in rates]
        ttft = spread(10.0, noise, reps)
        e2e = [t + 31 * p for t, p in zip(ttft, tpot, strict=True)]
        s.update(decode_tokens_per_s=rates, tpot_ms=tpot, ttft_ms=ttft, e2e_ms=e2e,
                 prefill_tokens_per_s=[128 / (t / 1e3) for t in ttft])
        m.update(ttft_ms=summarize(ttft), tpot_ms=summarize(tpot), e2e_ms=summarize(e2e),
                 decode_tokens_per_s=summarize(rates)["p50"], decode_tokens_per_s_summary=summarize(rates),
                 prefill_tokens_per_s=summarize(s["prefill_tokens_per_s"])["p50"], roofline_fraction=0.3)
    m.update(peak_memory_bytes=int(peak_mib * 2**20), weights_bytes=int(peak_mib / 10 * 2**20))
    if kld is not None:
        m.update(kld_mean=kld, kld_mean_stderr=kld / 100, ppl_ratio=1 + kld, top1_agreement=1 - kld,
                 gen_exact_match=1.0 if kld == 0 else 0.5, gen_common_prefix_mean=32.0 if kld == 0 else 20.0)
        rec["drift_ok"] = True
        rec["drift_violations"] = []
    m.update(extra_metrics)
    return rec


def write_run(run_dir: Path, records: list[dict], name: str = "handmade") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN, {
        "schema_version": SCHEMA_VERSION, "matrix": {"name": name}, "started": "2026-01-01T00:00:00Z",
        "ended": "2026-01-01T00:01:00Z", "launcher": "local", "shard": None,
        "environment": {"cpu_model": "Test CPU", "cpu_logical_cores": 2, "ram_bytes": 2**34, "gpus": [],
                        "libraries": {"torch": "2.x"}, "git": {"commit": "0123456789abcdef", "dirty": False},
                        "hostname": "host", "python": "3.11", "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
                        "machine": "x86_64", "system": "Linux", "release": "6.1.0", "python_implementation": "CPython",
                        "python_compiler": "GCC 12.2.0"},
        "roofline": {"cpu": {"memory": {"bandwidth_gbps": 25.0}, "matmul": {"float32": {"tflops": 0.3}}}},
    })
    for r in records:
        append_record(run_dir, r)
    return run_dir
