"""Drift inside matrix cells: figures in every record, one measurement per variant, budgets flagged."""

from __future__ import annotations

import pytest

from bench.launchers.local import LocalLauncher
from bench.matrix import parse_matrix
from bench.orchestrate import execute, start_run
from bench.results import validate_record

MATRIX = {
    "models": ["synthetic:llama-tiny"], "variants": ["fp32", "prune-50"], "devices": ["cpu"],
    "scenarios": [{"name": "generate", "batch_size": [1, 2], "prompt_tokens": [16], "new_tokens": [4]}],
    "measure": {"warmup": 0, "min_reps": 1, "max_reps": 1, "budget_s": 0, "timeout_s": 300,
                "roofline": False},
    "drift": {"context": 64, "max_tokens": 512, "gen_prompts": 2, "gen_prompt_tokens": 16, "gen_new_tokens": 8,
              "budget": {"max_kld_mean": 1e-3}},
}


def test_drift_lands_in_every_record_once_per_variant_and_budget_is_flagged(tmp_path, cache_dir):
    matrix = parse_matrix(MATRIX, "drift.toml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    records = execute(matrix, run_dir, LocalLauncher(run_dir / "logs"), cache_dir=str(cache_dir))
    assert len(records) == 4
    by_variant: dict[str, list] = {}
    for r in records:
        validate_record(r)
        assert r["status"] == "ok", r["error"]
        for key in ("perplexity", "ppl_ratio", "kld_mean", "kld_p99", "kld_max", "top1_agreement", "gen_exact_match"):
            assert key in r["metrics"], key
        assert r["metrics"]["drift_meaningful"] is False  # random weights
        by_variant.setdefault(r["variant"], []).append(r)
    for rs in by_variant.values():
        # computed in exactly one cell, reused (identical) in the other
        assert sorted(r["method"]["drift"]["computed_in_this_cell"] for r in rs) == [False, True]
        assert rs[0]["metrics"]["kld_mean"] == rs[1]["metrics"]["kld_mean"]
    fp32, pruned = by_variant["fp32"][0], by_variant["prune-50"][0]
    assert fp32["metrics"]["kld_mean"] < 1e-6 and fp32["metrics"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert fp32["drift_ok"] is True and fp32["drift_violations"] == []
    assert pruned["metrics"]["kld_mean"] > 1e-3
    assert pruned["drift_ok"] is False and "max_kld_mean" in pruned["drift_violations"][0]


def test_kv_cache_variant_is_scored_through_its_cache_in_the_cell_record(tmp_path, cache_dir):
    """The user's path: a named cache variant in a matrix gets drift read through its cache, said in the record."""
    pytest.importorskip("optimum.quanto", reason="kv-int4 needs optimum-quanto")
    matrix = parse_matrix({**MATRIX, "variants": ["fp32", "kv-int4"],
                           "scenarios": [{"name": "generate", "batch_size": [1], "prompt_tokens": [16],
                                          "new_tokens": [4]}],
                           "drift": {k: v for k, v in MATRIX["drift"].items() if k != "budget"}}, "drift.toml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    records = {r["variant"]: r for r in execute(matrix, run_dir, LocalLauncher(run_dir / "logs"),
                                                cache_dir=str(cache_dir))}
    for r in records.values():
        validate_record(r)
        assert r["status"] == "ok", r["error"]
    fp32, kv = records["fp32"], records["kv-int4"]
    assert fp32["metrics"]["drift_through_cache"] is False and fp32["method"]["drift"]["scoring"] == "full-window"
    assert "drift_kv_quantized_scored_tokens" not in fp32["metrics"]
    assert kv["metrics"]["drift_through_cache"] is True and kv["method"]["drift"]["scoring"] == "through-cache"
    through = kv["method"]["drift"]["through_cache"]
    assert through["cache"]["layer_class"] == "QuantoQuantizedLayer" and through["cache"]["residual_length"] == 128
    windows, scored = 512 // 64, kv["metrics"]["scored_tokens"]
    assert scored == windows * 63
    # the one-token prefill is quantized at once, so every later step reads quantized entries
    assert kv["metrics"]["drift_kv_quantized_scored_tokens"] == windows * 62
    assert kv["metrics"]["kld_mean"] > 0 and "gen_exact_match" in kv["metrics"]
