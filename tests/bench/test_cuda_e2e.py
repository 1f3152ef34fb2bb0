"""End to end on CUDA: ``infermatrix run`` through the real runner and launcher (needs a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import read_records, validate_record
from bench.runner import FORKSERVER

ROOT = Path(__file__).resolve().parents[2]

MATRIX = """
name = "cuda-e2e"
models = ["synthetic:llama-tiny"]
variants = ["fp32", "bf16", "static-kv-bf16-cudagraphs"]
devices = ["cuda"]

[[scenarios]]
name = "generate"
batch_size = [1]
prompt_tokens = [16]
new_tokens = [8]

[measure]
warmup = 1
min_reps = 2
max_reps = 3
budget_s = 0
timeout_s = 240

[[recipe]]
name = "static-kv-bf16-cudagraphs"
steps = [{technique = "cast", dtype = "bfloat16"},
         {technique = "kv-cache", mode = "static", compile = true, compile_mode = "reduce-overhead"}]
"""


@pytest.mark.cuda
@pytest.mark.slow
def test_cli_run_on_cuda_records_cuda_event_timing_and_cuda_memory(cuda_only, tmp_path, cache_dir):
    matrix = tmp_path / "cuda.toml"
    matrix.write_text(MATRIX)
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--out", str(run_dir), "--no-drift",
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    records = {r["variant"]: r for r in read_records(run_dir)}
    assert out.returncode == 0, out.stderr[-3000:] + json.dumps({k: r.get("error") for k, r in records.items()})
    assert set(records) == {"fp32", "bf16", "static-kv-bf16-cudagraphs"}
    for variant, record in records.items():
        validate_record(record)
        assert record["status"] == "ok", (variant, record["error"])
        assert record["device"] == "cuda"
        assert record["method"]["clock"] == "cuda_event"
        assert record["method"]["process_start"] == FORKSERVER  # the fork server never initialised CUDA
        metrics = record["metrics"]
        assert metrics["cuda_max_allocated_bytes"] > 0
        assert metrics["peak_memory_bytes"] == metrics["cuda_max_allocated_bytes"]
        assert metrics["weights_bytes"] < metrics["cuda_max_allocated_bytes"]
        # Serving holds the weights (allocated at load) plus the KV cache and activations.
        assert metrics["weights_bytes"] < metrics["serving_peak_memory_bytes"] <= metrics["peak_memory_bytes"]
        assert metrics["peak_memory_bytes"] == max(metrics["load_peak_memory_bytes"],
                                                   metrics["serving_peak_memory_bytes"])
        assert metrics["decode_tokens_per_s"] > 0
    graphs = records["static-kv-bf16-cudagraphs"]
    assert graphs["timing_s"]["compile_and_capture"] > 0
    assert graphs["method"]["compiled_decode_step"]["compile_call_wall_s"] > graphs["metrics"]["e2e_ms"]["p50"] / 1e3
    # the decode step was replayed as a CUDA graph: inductor skipped none (it falls back silently otherwise)
    assert graphs["method"]["compiled_decode_step"]["cudagraph_skips"] == 0, graphs["labels"]
