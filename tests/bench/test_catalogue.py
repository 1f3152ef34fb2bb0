"""The metric catalogue is complete: every metric a real run writes has an entry and a schema property."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.catalogue import METRICS, comparable, interval, metric, point
from bench.results import SCHEMA_PATH
from optimize.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[2] / "reports" / "example" / "results.jsonl"
SCHEMA_METRICS = json.loads(SCHEMA_PATH.read_text())["properties"]["metrics"]["properties"]


def assert_catalogued(keys, where: str) -> None:
    missing = sorted(set(keys) - set(METRICS))
    assert not missing, f"metrics written by {where} are not in bench/catalogue.py: {missing}"
    unschema = sorted(set(keys) - set(SCHEMA_METRICS))
    assert not unschema, f"metrics written by {where} are not in the record schema: {unschema}"


def test_catalogue_and_schema_list_the_same_metrics_with_matching_shapes():
    assert set(METRICS) == set(SCHEMA_METRICS)
    for key, m in METRICS.items():
        prop = SCHEMA_METRICS[key]
        assert (prop.get("$ref") == "#/$defs/summary") == (m.shape == "summary"), key
        assert m.direction in ("lower", "higher", None) and m.kind in ("speed", "memory", "size", "drift", "info")
        assert m.unit or m.shape in ("object", "boolean"), f"{key} has no unit"
        if m.shape in ("scalar", "summary") and m.fmt != "d":
            format(1.5 * m.scale, m.fmt)  # raises on a bad format spec


def test_every_metric_of_the_committed_default_run_is_catalogued():
    records = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert_catalogued({k for r in records for k in r["metrics"]}, "the default run (reports/example)")


def test_every_metric_of_prefill_decode_and_generate_scenarios_is_catalogued(tiny_ref, cache_dir, tiny_prompts):
    from bench.metrics.timing import RepeatConfig
    from bench.scenarios import DecodeScenario, Footprint, GenerateScenario, PrefillScenario
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    repeat = RepeatConfig(warmup=0, min_reps=1, max_reps=1, budget_s=0)
    footprint = Footprint(weights_bytes=10**6, kv_bytes_per_token=64)
    written = set()
    for scenario in (GenerateScenario(batch_size=1, prompt_tokens=8, new_tokens=3),
                     PrefillScenario(batch_size=1, prompt_tokens=8),
                     DecodeScenario(batch_size=1, prompt_tokens=8, new_tokens=3)):
        written |= set(scenario.run(state, tiny_prompts, repeat, footprint)[0])
    assert_catalogued(written, "the scenarios")


def test_every_cuda_memory_metric_is_catalogued(monkeypatch):
    """The CUDA cell's memory keys, with torch made to report a device (no GPU needed)."""
    import torch

    from bench.metrics import memory

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 2)
    monkeypatch.setattr(memory, "nvml_process_memory", lambda: (None, "NVML did not start"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    from bench.metrics import memory_cell

    figures, _ = memory_cell.measure_memory("cuda", 0, memory_cell.close_load_window("cuda"))
    assert_catalogued(set(figures), "a CUDA cell")


def test_lookups_give_direction_kind_and_intervals():
    assert metric("tpot_ms").direction == "lower" and metric("tpot_ms").kind == "speed"
    assert metric("decode_tokens_per_s").better(2.0, 1.0) and not metric("kld_mean").better(2.0, 1.0)
    assert metric("peak_memory_bytes").format(2**20 * 3) == "3.0"
    with pytest.raises(InputError, match="did you mean ttft_ms"):
        metric("ttft_msec")
    with pytest.raises(InputError, match="informational"):
        comparable("scored_tokens")
    rec = {"metrics": {"ttft_ms": {"p50": 2.0, "n": 5, "ci95_p50": [1.0, 3.0]}, "decode_tokens_per_s": 9.0,
                       "decode_tokens_per_s_summary": {"p50": 9.0, "ci95_p50": [8.0, 10.0]},
                       "kld_mean": 0.5, "kld_mean_stderr": 0.1}}
    assert point(rec, "ttft_ms") == 2.0 and interval(rec, "ttft_ms") == (1.0, 3.0)
    assert interval(rec, "decode_tokens_per_s") == (8.0, 10.0)
    assert interval(rec, "kld_mean") == pytest.approx((0.5 - 0.196, 0.5 + 0.196))
    assert point(rec, "weights_bytes") is None and interval(rec, "weights_bytes") is None


def test_a_rate_kept_as_samples_and_its_roofline_figures_have_the_rates_interval():
    """A generate cell keeps its prefill rate's repetitions but no summary of them: the interval is computed
    from them; a roofline figure is a fixed multiple of its rate's median, so its interval is the rate's, scaled."""
    from bench.catalogue import interval_coverage, sample_count
    from bench.stats import summarize

    prefill = [900.0, 950.0, 1000.0, 1050.0, 1100.0]
    rec = {"metrics": {"prefill_tokens_per_s": 1000.0, "prefill_tflops": 2.0, "prefill_flops_fraction": 0.5,
                       "decode_tokens_per_s": 10.0, "decode_tokens_per_s_summary": {
                           "p50": 10.0, "n": 7, "ci95_p50": [9.0, 12.0], "ci_coverage": 0.98},
                       "decode_bandwidth_gbps": 40.0, "roofline_fraction": 0.25},
           "samples": {"prefill_tokens_per_s": prefill}}
    ci = summarize(prefill)["ci95_p50"]
    assert interval(rec, "prefill_tokens_per_s") == (ci[0], ci[1]) == (900.0, 1100.0)
    assert interval(rec, "prefill_tflops") == pytest.approx((1.8, 2.2))
    assert interval(rec, "prefill_flops_fraction") == pytest.approx((0.45, 0.55))
    assert interval(rec, "decode_bandwidth_gbps") == pytest.approx((36.0, 48.0))
    assert interval(rec, "roofline_fraction") == pytest.approx((0.225, 0.3))
    assert sample_count(rec, "prefill_tflops") == 5 and sample_count(rec, "roofline_fraction") == 7
    assert interval_coverage(rec, "roofline_fraction") == 0.98
    # Without the rate's repetitions (or its figure) there is no interval, never a zero-width one.
    bare = {"metrics": {"prefill_tokens_per_s": 1000.0, "prefill_tflops": 2.0, "roofline_fraction": 0.25}}
    assert interval(bare, "prefill_tokens_per_s") is None and interval(bare, "prefill_tflops") is None
    assert interval(bare, "roofline_fraction") is None and sample_count(bare, "prefill_tflops") is None


def test_a_metric_added_to_the_catalogue_reaches_the_csv_and_select(monkeypatch):
    from bench.catalogue import Metric
    from bench.report.csv import csv_report
    from bench.select import select
    from tests.bench.records import record

    monkeypatch.setitem(METRICS, "joules_per_token_j", Metric("joules_per_token_j", "J", "lower", "J/token", ".3f",
                                                              "speed"))
    recs = [record("a", joules_per_token_j=0.5), record("b", joules_per_token_j=0.2)]
    header = csv_report(recs).splitlines()[0].split(",")
    assert "joules_per_token_j" in header
    assert select(recs, objective="joules_per_token_j")[0].chosen == "b"
