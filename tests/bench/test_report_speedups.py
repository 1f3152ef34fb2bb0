"""Speedups in the comparison table: the reference row, the ratio of medians and its 95% interval."""

from __future__ import annotations

import math

import pytest

from bench.report.table import group_records, speedup_interval, speedup_text
from bench.report.write import render
from bench.stats import summarize
from tests.bench.example_records import example_records, first_repetitions
from tests.bench.records import record, write_run


def _with_e2e(variant: str, samples: list[float], steps: int = 1, **kw) -> dict:
    r = record(variant, steps=steps, **kw)
    r["samples"]["e2e_ms"] = samples
    r["metrics"]["e2e_ms"] = summarize(samples)
    return r


def _rows(records):
    (group,) = group_records(records)
    return group, {row.variant: row for row in group.rows}


def test_the_speedup_is_the_ratio_of_medians_with_the_reference_at_exactly_one():
    ref = _with_e2e("fp32", [100.0, 101.0, 99.0, 100.5, 99.5], steps=0)
    fast = _with_e2e("fast", [50.0, 50.5, 49.5, 50.2, 49.8])
    group, rows = _rows([ref, fast])
    assert group.reference == "fp32" and group.speedup_metric == "e2e_ms"
    assert rows["fp32"].speedup == (1.0, 1.0, 1.0) and speedup_text(rows["fp32"]) == "1.00x (ref)"
    ratio, low, high = rows["fast"].speedup
    assert ratio == 100.0 / 50.0
    # Percentile bootstrap of median(ref) / median(var): every resampled median lies within each side's
    # range, so the interval lies within 99/50.5 .. 101/49.5 and holds the ratio.
    assert 99 / 50.5 <= low <= ratio <= high <= 101 / 49.5 and low < high
    assert speedup_text(rows["fast"]) == f"2.00x [{low:.2f}, {high:.2f}]"
    # From both rows' own samples, not the ratio of their summaries' interval ends.
    assert (low, high) == speedup_interval(ref["samples"]["e2e_ms"], fast["samples"]["e2e_ms"], {}, {}, "e2e_ms")
    (ref_low, ref_high) = ref["metrics"]["e2e_ms"]["ci95_p50"]
    (var_low, var_high) = fast["metrics"]["e2e_ms"]["ci95_p50"]
    assert (low, high) != (ref_low / var_high, ref_high / var_low)
    assert group.title == "tiny on cpu: generate, batch 1, prompt 128, new 32"


def test_constant_samples_give_an_exact_interval():
    low, high = speedup_interval([10.0] * 5, [5.0] * 5, {"a": 1}, {"b": 2}, "e2e_ms")
    assert (low, high) == (2.0, 2.0)


def test_too_few_samples_fall_back_to_the_ratio_of_the_interval_ends():
    ref = record("fp32", steps=0)
    var = record("v")
    ref["metrics"]["e2e_ms"]["ci95_p50"], var["metrics"]["e2e_ms"]["ci95_p50"] = [90.0, 110.0], [40.0, 60.0]
    assert speedup_interval([100.0, 101.0], [50.0] * 5, ref, var, "e2e_ms") == (90.0 / 60.0, 110.0 / 40.0)
    assert speedup_interval(None, [50.0] * 5, ref, var, "e2e_ms") == (90.0 / 60.0, 110.0 / 40.0)
    var["metrics"]["e2e_ms"]["ci95_p50"] = [0.0, 60.0]  # an interval touching zero gives no ratio
    assert all(math.isnan(x) for x in speedup_interval(None, None, ref, var, "e2e_ms"))
    del var["metrics"]["e2e_ms"]["ci95_p50"]
    assert all(math.isnan(x) for x in speedup_interval(None, None, ref, var, "e2e_ms"))
    assert speedup_interval(None, None, ref, ref, "e2e_ms") == (1.0, 1.0)  # the reference against itself


def test_a_ratio_without_an_interval_is_printed_bare():
    ref, var = record("fp32", steps=0), record("v")
    for r in (ref, var):
        r["samples"]["e2e_ms"] = [100.0 if r is ref else 80.0]
        r["metrics"]["e2e_ms"] = {"p50": r["samples"]["e2e_ms"][0]}  # one repetition, no interval
    _, rows = _rows([ref, var])
    assert rows["v"].speedup[0] == 1.25 and speedup_text(rows["v"]) == "1.25x"


def test_the_reference_is_fp32_or_else_the_first_ok_variant_without_steps():
    a = _with_e2e("a", [80.0] * 5)
    base = _with_e2e("base", [100.0] * 5, steps=0)
    fp32 = _with_e2e("fp32", [120.0] * 5)  # named fp32: the reference even with steps
    group, rows = _rows([a, base, fp32])
    assert group.reference == "fp32" and rows["a"].speedup[0] == 120.0 / 80.0
    fp32_failed = record("fp32", status="failed", error="boom")
    group, rows = _rows([a, base, fp32_failed])
    assert group.reference == "base" and rows["a"].speedup[0] == 100.0 / 80.0 and rows["fp32"].speedup is None
    first_failed = record("fp32", status="failed", error="boom")
    first_failed["metrics"]["e2e_ms"] = summarize([50.0] * 5)  # a figure from before it failed: not compared
    no_e2e = record("x", decode=None)
    group, rows = _rows([first_failed, no_e2e, a, base])
    assert group.reference == "base" and rows["a"].speedup[0] == 100.0 / 80.0
    assert rows["fp32"].speedup is None and rows["x"].speedup is None
    unnamed = _with_e2e("unnamed", [90.0] * 5)
    del unnamed["recipe"]  # a record without its recipe counts as having no steps
    group, rows = _rows([a, unnamed])
    assert group.reference == "unnamed" and rows["a"].speedup[0] == 90.0 / 80.0
    group, rows = _rows([a])  # no reference at all: no speedups
    assert group.reference is None and rows["a"].speedup is None and speedup_text(rows["a"]) == "-"


def test_prefill_groups_compare_time_to_first_token_and_skip_what_cannot_be_divided():
    scenario = {"name": "prefill", "batch_size": 1, "prompt_tokens": 64, "new_tokens": 1}
    ref, var, zero, quick = (record(v, scenario=scenario, steps=s)
                             for v, s in (("fp32", 0), ("v", 1), ("zero", 1), ("quick", 1)))
    ref["metrics"]["ttft_ms"] = summarize([20.0] * 5)
    var["metrics"]["ttft_ms"] = summarize([10.0] * 5)
    zero["metrics"]["ttft_ms"] = summarize([0.0] * 5)
    quick["metrics"]["ttft_ms"] = summarize([0.5] * 5)  # under a millisecond
    for r in (ref, var, zero, quick):
        r["samples"]["ttft_ms"] = [r["metrics"]["ttft_ms"]["p50"]] * 5
    group, rows = _rows([ref, var, zero, quick])
    assert group.speedup_metric == "ttft_ms" and rows["v"].speedup == (2.0, 2.0, 2.0)
    assert rows["zero"].speedup is None  # a zero latency has no ratio
    assert rows["quick"].speedup == (40.0, 40.0, 40.0)
    assert speedup_text(rows["v"]) == "2.00x [2.00, 2.00]"


@pytest.mark.parametrize("bad", [None, [1.0, "x", 2.0], [1.0, math.nan, 2.0]])
def test_samples_that_are_not_all_numbers_use_the_interval_ends(bad):
    ref, var = record("fp32", steps=0), record("v")
    ref["metrics"]["e2e_ms"]["ci95_p50"], var["metrics"]["e2e_ms"]["ci95_p50"] = [90.0, 110.0], [40.0, 60.0]
    assert speedup_interval(bad, [50.0] * 5, ref, var, "e2e_ms") == (1.5, 2.75)


def test_rows_without_samples_take_the_interval_ends_of_their_figure():
    ref, var = record("fp32", steps=0), record("v")
    for r, ci in ((ref, [300.0, 340.0]), (var, [150.0, 170.0])):
        del r["samples"]["e2e_ms"]
        r["metrics"]["e2e_ms"]["ci95_p50"] = ci
    _, rows = _rows([ref, var])
    ratio, low, high = rows["v"].speedup
    assert (low, high) == (300.0 / 170.0, 340.0 / 150.0) and ratio == pytest.approx(
        ref["metrics"]["e2e_ms"]["p50"] / var["metrics"]["e2e_ms"]["p50"])


def _example(*variants: str, reps: int | None = None) -> list[dict]:
    records = [r for r in example_records() if r["variant"] in variants]
    return [first_repetitions(r, reps) for r in records] if reps else records


def test_a_speedup_resting_on_too_few_repetitions_is_marked_however_narrow_its_interval(tmp_path):
    """The example's cells as they would read after 2 repetitions: the row's every other timing is marked,
    and so is its speedup, whose interval is 7% wide.
    """
    records = _example("fp32", "bf16", reps=2)
    _, rows = _rows(records)
    assert speedup_text(rows["bf16"]) == "1.14x [1.10, 1.18] ~" and rows["bf16"].speedup_noisy
    assert speedup_text(rows["fp32"]) == "1.00x (ref)" and not rows["fp32"].speedup_noisy  # exact by definition
    run = write_run(tmp_path / "run", records)
    bf16 = next(line for line in render(run, "md").splitlines() if line.startswith("| bf16 |"))
    assert bf16.startswith("| bf16 | 13.46 [13.33, 13.59] ~ | 5.12 [5.02, 5.21] ~ | 2 | 1.14x [1.10, 1.18] ~ | ")
    (group,) = __import__("json").loads(render(run, "json"))["groups"]
    assert {row["variant"]: row["speedup_noisy"] for row in group["rows"]} == {"fp32": False, "bf16": True}
    # One side is enough: the reference on 2 repetitions, the variant on all 5.
    _, rows = _rows(_example("fp32", reps=2) + _example("bf16"))
    assert rows["bf16"].speedup_noisy


def test_a_speedup_is_marked_when_its_interval_is_wider_than_a_tenth_of_it_as_a_figure_is():
    _, rows = _rows(_example("fp32", "bf16", "torch-int8-dynamic"))
    assert speedup_text(rows["bf16"]) == "1.12x [1.04, 1.18] ~"  # 12.5% of the ratio, on 5 repetitions a side
    assert speedup_text(rows["torch-int8-dynamic"]) == "1.15x [1.09, 1.19]"  # 8.7%
