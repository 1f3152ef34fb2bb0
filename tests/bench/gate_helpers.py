"""Synthetic run directories with known sample distributions, for the gate's tests."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from bench.compare import Side, cell_key
from bench.results import RESULTS, RUN

ENV = {"cpu_model": "Test CPU", "cpu_logical_cores": 2, "cpu_affinity": 2, "gpus": [],
       "libraries": {"torch": "2.13.0+cpu", "transformers": "4.57.6"}, "env_vars": {},
       "torch": {"num_threads": 2}, "git": {"commit": "0" * 40, "dirty": False}}


def lognormal(rng: np.random.Generator, n: int, cv: float, scale: float = 1.0) -> list[float]:
    """``n`` right-skewed timings with relative spread ``cv`` around ``scale``."""
    return list(scale * np.exp(rng.normal(0.0, cv, n)))


def record(variant: str, samples: dict[str, list[float]], peak_memory: float = 4e8, status: str = "ok",
           model: str = "synthetic:llama-tiny", scenario: dict | None = None) -> dict:
    scenario = scenario or {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 8}
    cell_id = hashlib.sha256(json.dumps([model, variant, scenario], sort_keys=True).encode()).hexdigest()[:16]
    return {"schema_version": 1, "cell_id": cell_id, "model": model, "variant": variant,
            "recipe": {"name": variant, "steps": []}, "device": "cpu", "scenario": scenario, "status": status,
            "error": None if status == "ok" else "boom",
            "metrics": {"peak_memory_bytes": int(peak_memory)} if status == "ok" else {},
            "samples": samples if status == "ok" else {}, "method": {}, "labels": [], "timing_s": {}}


_STARTS = itertools.count()


def write_run(path: Path, records: list[dict], env: dict | None = None, commit: str = "0" * 40) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    environment = json.loads(json.dumps(env or ENV))
    environment["git"] = {"commit": commit, "dirty": False}
    # each run its own start, a second after the one written before: two runs written here are two runs, not
    # one run's copies (bench.results.run_identity), in the order they were written
    start = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(_STARTS))
    (path / RUN).write_text(json.dumps({"schema_version": 1, "environment": environment, "matrix_hash": "m",
                                        "matrix": {"name": "synthetic"}, "started": f"{start:%Y-%m-%dT%H:%M:%SZ}",
                                        "ended": f"{start + timedelta(minutes=1):%Y-%m-%dT%H:%M:%SZ}",
                                        "shard": None}))
    (path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def timing_samples(rng: np.random.Generator, n: int, cv: float, slowdown: float = 1.0) -> dict[str, list[float]]:
    """Samples of the generate metrics for one process; ``slowdown`` scales the latencies."""
    ttft = lognormal(rng, n, cv, 12.0 * slowdown)
    tpot = lognormal(rng, n, cv, 3.2 * slowdown)
    e2e = [a + 31 * b for a, b in zip(ttft, tpot, strict=True)]
    return {"ttft_ms": ttft, "tpot_ms": tpot, "e2e_ms": e2e, "decode_tokens_per_s": [1000 / t for t in tpot]}


def synthetic_run(path: Path, rng: np.random.Generator, cells: int, cv: float = 0.05, reps: int = 5,
                  rounds: int = 1, slowdown: dict[str, float] | None = None, **kwargs) -> Path:
    """A run of ``cells`` cells, each measured in ``rounds`` processes of ``reps`` repetitions."""
    slowdown = slowdown or {}
    recs = [record(f"v{i}", timing_samples(rng, reps, cv, slowdown.get(f"v{i}", 1.0)))
            for _ in range(rounds) for i in range(cells)]
    return write_run(path, recs, **kwargs)


def side(records: list[dict], env: dict | None = None, name: str = "run") -> Side:
    """A loaded run of these ok records (as ``bench.compare.load_side`` groups them), without files."""
    ok = defaultdict(list)
    for r in records:
        ok[cell_key(r)].append(r)
    return Side(Path(name), {"environment": env or ENV}, dict(ok), {})
