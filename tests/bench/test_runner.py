"""The isolated runner: truthful timing, and failures that stay in their cell."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from bench.launchers.local import LocalLauncher
from bench.matrix import load_matrix, narrow
from bench.orchestrate import execute, start_run
from bench.results import read_records, validate_record
from tests.bench.faulty import make_faulty

PROMPT, NEW = 256, 24  # a long prompt keeps TTFT well above generate()'s fixed ~0.5 ms of Python


def _independent_measurement(ref, prompts, reps: int = 7) -> tuple[float, float]:
    """TTFT and decode tokens/s of the same generate call, timed from outside with perf_counter.

    TTFT is the wall time of a one-token generate call; decode rate is (N - 1) tokens over
    the extra time an N-token call takes.
    """
    import torch

    from optimize.models import load_torch_model

    model = load_torch_model(ref.path, "cpu")
    ids = prompts[:1]
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    timed(NEW)  # warm-up
    one = statistics.median(timed(1) for _ in range(reps))
    full = statistics.median(timed(NEW) for _ in range(reps))
    return one * 1e3, (NEW - 1) / (full - one)


def test_harness_timing_agrees_with_independent_measurement(tmp_path, tiny_ref, cache_dir):
    from bench.prompts import prompt_ids

    matrix = narrow(load_matrix(), models=["synthetic:llama-tiny"], variants=["fp32"], devices=["cpu"], batch_size=[1],
                    prompt_tokens=[PROMPT], new_tokens=[NEW], repeat={"warmup": 2, "min_reps": 7, "budget_s": 0},
                    drift=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    [record] = execute(matrix, run_dir, LocalLauncher(run_dir / "logs"), cache_dir=str(cache_dir))
    assert record["status"] == "ok", record["error"]
    validate_record(record)
    prompts, _ = prompt_ids(tiny_ref, 8192, 1, PROMPT)
    ttft_ms, decode_tps = _independent_measurement(tiny_ref, prompts)
    assert 0 < record["metrics"]["roofline_fraction"] <= 1.1  # measurement sanity: never far above the ceiling
    harness_ttft = record["metrics"]["ttft_ms"]["p50"]
    harness_tps = record["metrics"]["decode_tokens_per_s"]
    assert harness_tps == pytest.approx(decode_tps, rel=0.15), (harness_tps, decode_tps)
    assert harness_ttft == pytest.approx(ttft_ms, rel=0.15), (harness_ttft, ttft_ms)


def test_failing_cells_are_recorded_and_the_matrix_goes_on(tmp_path, tiny_ref, cache_dir):
    base = Path(tiny_ref.path)
    models = [make_faulty(base, tmp_path / f"faulty-{f}", f) for f in ("raise", "abort", "hang")]
    matrix = narrow(load_matrix(), models=[str(m) for m in models] + ["synthetic:llama-tiny"], variants=["fp32"],
                    devices=["cpu"],
                    batch_size=[1], prompt_tokens=[16], new_tokens=[4], trust_remote_code=True,
                    repeat={"warmup": 0, "min_reps": 1, "max_reps": 1, "budget_s": 0}, timeout_s=45,
                    drift=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    records = {Path(r["model"]).name: r for r in execute(matrix, run_dir, LocalLauncher(run_dir / "logs"),
                                                           cache_dir=str(cache_dir))}
    assert records["synthetic:llama-tiny"]["status"] == "ok"
    assert records["faulty-raise"]["status"] == "failed"
    assert "forward raised on purpose" in records["faulty-raise"]["error"]
    assert records["faulty-abort"]["status"] == "failed"
    assert "SIGABRT" in records["faulty-abort"]["error"]
    assert records["faulty-hang"]["status"] == "failed"
    assert "timed out after 45 s" in records["faulty-hang"]["error"]
    for record in records.values():
        validate_record(record)
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["cell_id"] for line in lines)
    assert len(read_records(run_dir)) == 4
