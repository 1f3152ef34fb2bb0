"""How the gate matches, measures and withholds, exactly: each row's figures, the FDR correction deciding,
machine load, status rows, the environment check, loading runs and the JSON a pipeline reads.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import gate_stats as gs
from bench.compare import Comparison, Row, compare_runs, compare_sides, environment_diffs, load_side, metric_blocks
from optimize.errors import InputError
from tests.bench.gate_helpers import ENV, record, side, write_run

ONE = gs.GateConfig(n_resamples=500, min_processes=1)


def _steady(values: list[float]) -> dict[str, list[float]]:
    """The generate metrics of one process with these TPOTs (TTFT and e2e follow them)."""
    return {"ttft_ms": [4 * t for t in values], "tpot_ms": list(values), "e2e_ms": [35 * t for t in values],
            "decode_tokens_per_s": [1000 / t for t in values]}


def _rows(c: Comparison) -> dict[str, Row]:
    return {f"{r.cell.split()[1]}:{r.metric}": r for r in c.rows}


def test_a_row_holds_every_figure_of_its_comparison():
    base_tpot = [[3.0, 3.1, 2.9, 3.05, 2.95], [3.2, 3.0, 3.1, 2.9, 3.0]]
    head_tpot = [[3.9, 4.3, 3.7, 4.1, 3.8], [4.2, 3.6, 4.4, 4.0, 4.1]]  # slower and noisier than base
    base = side([record("fp32", _steady(b), peak_memory=m) for b, m in zip(base_tpot, (4.0e8, 4.1e8), strict=True)])
    head = side([record("fp32", _steady(h), peak_memory=m) for h, m in zip(head_tpot, (4.2e8, 4.4e8), strict=True)])
    cfg = gs.GateConfig(n_resamples=700, level=0.95, power=0.9, fdr=0.05, seed=3, min_processes=1)
    rows = _rows(compare_sides(base, head, cfg))
    assert len(rows) == 5 and "fp32:prefill_tokens_per_s" not in rows  # a metric neither side has is left out

    tpot = rows["fp32:tpot_ms"]
    pb, ph = sum(base_tpot, []), sum(head_tpot, [])
    assert (tpot.label, tpot.unit, tpot.direction, tpot.kind) == ("TPOT ms", "ms", "lower", "speed")
    assert (tpot.n_base, tpot.n_head, tpot.blocks_base, tpot.blocks_head) == (10, 10, 2, 2)
    assert (tpot.base_median, tpot.head_median) == (np.median(pb), np.median(ph))
    assert (tpot.ratio, tpot.low, tpot.high) == gs.ratio_interval(base_tpot, head_tpot, 0.95, 700, 3)
    noise = gs.process_noise([base_tpot, head_tpot])  # the one cell's two sides: 2 degrees of freedom
    assert noise.df == 2 and tpot.process_sd == 0
    assert tpot.p_rank == gs.rank_p(base_tpot, head_tpot)
    assert tpot.p_process == gs.process_p(base_tpot, head_tpot, noise)
    assert tpot.p == max(tpot.p_rank, tpot.p_process) == tpot.p_process and tpot.q is not None and tpot.q >= tpot.p
    assert tpot.threshold == 0.05
    cv = max(gs.robust_cv(base_tpot), gs.robust_cv(head_tpot))
    assert tpot.cv == cv == gs.robust_cv(head_tpot)
    assert tpot.mde == gs.mde(cv, 10, 10, 0.95, 0.9, 0.05, noise.var, (2, 2))
    assert noise.var == 0  # the processes agree as closely as their repetitions predict: no MDE added
    assert tpot.verdict == "regressed" and tpot.note == ""

    mem = rows["fp32:peak_memory_bytes"]  # one figure per process: 2 + 2 can never reach q = 0.05
    assert (mem.kind, mem.unit, mem.direction, mem.threshold) == ("memory", "bytes", "lower", 0.02)
    assert (mem.n_base, mem.n_head, mem.p, mem.q, mem.mde) == (2, 2, None, None, None)
    assert (mem.ratio, mem.low, mem.high) == pytest.approx((4.3e8 / 4.05e8, 4.2e8 / 4.1e8, 4.4e8 / 4.0e8))
    assert mem.cv == pytest.approx(max(gs.robust_cv([[4.0e8], [4.1e8]]), gs.robust_cv([[4.2e8], [4.4e8]])))
    assert mem.verdict == "regressed"  # the ranges do not overlap and every pairing is beyond +2%


def test_memory_uses_its_tighter_band():
    base = side([record("fp32", _steady([3.0] * 5), peak_memory=4.00e8)])
    head = side([record("fp32", _steady([3.0] * 5), peak_memory=4.12e8)])  # +3%: beyond 2%, within 5%
    rows = _rows(compare_sides(base, head, ONE))
    assert rows["fp32:peak_memory_bytes"].verdict == "regressed" and rows["fp32:tpot_ms"].verdict == "unchanged"


def _separated(variant: str, slowdown: float) -> list[dict]:
    return [record(variant, _steady([3.0 * slowdown * (1 + i / 100) for i in range(5)]))]


def test_the_rank_test_after_correction_decides_not_the_interval_alone():
    # 5 against 5, every head repetition slower: p = 2/252 = 0.0079 for each of the four speed metrics.
    alone = compare_sides(side(_separated("v0", 1.0)), side(_separated("v0", 1.3)), ONE)
    tpot = _rows(alone)["v0:tpot_ms"]
    assert tpot.p == pytest.approx(2 / 252) and tpot.q == pytest.approx(2 / 252) and tpot.verdict == "regressed"
    assert tpot.low > 1.05  # the interval lies beyond the band
    # The same pair among two unchanged cells: 12 tests, the four smallest p get q = p x 12 / 4 > 0.01.
    base = _separated("v0", 1.0) + _separated("v1", 1.0) + _separated("v2", 1.0)
    head = _separated("v0", 1.3) + _separated("v1", 1.0) + _separated("v2", 1.0)
    rows = _rows(compare_sides(side(base), side(head), ONE))
    assert rows["v0:tpot_ms"].low > 1.05 and rows["v0:tpot_ms"].q == pytest.approx(2 / 252 * 3)
    assert rows["v0:tpot_ms"].verdict == "inconclusive" and rows["v1:tpot_ms"].verdict == "unchanged"
    # With a looser false discovery rate it stands again.
    looser = _rows(compare_sides(side(base), side(head), gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05)))
    assert looser["v0:tpot_ms"].verdict == "regressed"


def test_the_rank_test_runs_when_its_smallest_p_equals_the_false_discovery_rate():
    cfg = gs.GateConfig(n_resamples=500, min_processes=1, fdr=gs.min_rank_p(5, 5))
    row = _rows(compare_sides(side(_separated("v0", 1.0)), side(_separated("v0", 1.3)), cfg))["v0:tpot_ms"]
    assert row.p == pytest.approx(2 / 252) and row.mde is not None and row.verdict == "regressed"
    cfg = gs.GateConfig(n_resamples=500, min_processes=1, fdr=gs.min_rank_p(5, 5) * 0.99)
    row = _rows(compare_sides(side(_separated("v0", 1.0)), side(_separated("v0", 1.3)), cfg))["v0:tpot_ms"]
    assert (row.p, row.q, row.mde) == (None, None, None)
    # Untested: no verdict for speed, though the range of every pairing lies beyond the band (3.9/3.12 > 1.05).
    assert row.low == pytest.approx(3.9 / (3.0 * 1.04)) and row.verdict == "inconclusive"


def test_a_speed_row_too_small_for_the_rank_test_gets_no_verdict_and_memory_keeps_its_range_rule():
    """3 against 2 repetitions fall wholly apart in one ordering of 10 by chance: speed says nothing; peak
    memory (one figure a process, never testable) counts when the two sides' ranges do not overlap."""
    base = side([record("v0", _steady([3.0, 3.03, 3.06]), peak_memory=4.0e8)])
    head = side([record("v0", _steady([3.9, 3.93]), peak_memory=4.4e8)])
    rows = _rows(compare_sides(base, head, ONE))
    for metric in ("tpot_ms", "ttft_ms", "e2e_ms", "decode_tokens_per_s"):
        row = rows[f"v0:{metric}"]
        assert (row.p, row.q, row.verdict, row.note) == (None, None, "inconclusive", ""), metric
    tpot = rows["v0:tpot_ms"]
    assert (tpot.low, tpot.high) == pytest.approx((3.9 / 3.06, 3.93 / 3.0))  # wholly beyond +5%
    assert rows["v0:peak_memory_bytes"].verdict == "regressed"
    lower = side([record("v0", _steady([3.9, 3.93]), peak_memory=3.6e8)])
    assert _rows(compare_sides(base, lower, ONE))["v0:peak_memory_bytes"].verdict == "improved"


def _normal_quantiles(n: int, cv: float, scale: float) -> list[float]:
    """``n`` log-normal timings at evenly spaced quantiles: spread ``cv``, median ``scale``, no chance draw."""
    from scipy.stats import norm

    return list(scale * np.exp(cv * norm.ppf((np.arange(n) + 0.5) / n)))


WITHHELD = "{} withheld: the change is smaller than the MDE ({}), the smallest change this noise lets the gate detect"


@pytest.mark.parametrize(("n", "cv", "change", "verdict", "note"), [
    (10, 0.14, 1.3, "regressed", ""),  # MDE 26.9%: a 30% slowdown is beyond it
    (10, 0.16, 1.3, "inconclusive", WITHHELD.format("regressed", "30.7%")),
    (14, 0.14, 1 / 1.25, "improved", ""),  # MDE 22.7%: 25% faster is beyond it
    (14, 0.16, 1 / 1.25, "inconclusive", WITHHELD.format("improved", "25.9%")),
])
def test_a_change_smaller_than_the_mde_gets_no_verdict(n, cv, change, verdict, note):
    """n against n, 30% slower or 25% faster: each significant with its interval beyond the band; the
    noisier pair's MDE exceeds the change, and a threshold below the MDE would report noise."""
    base = side([record("v0", _steady(_normal_quantiles(n, cv, 3.0)))])
    head = side([record("v0", _steady(_normal_quantiles(n, cv, 3.0 * change)))])
    row = _rows(compare_sides(base, head, ONE))["v0:tpot_ms"]
    assert row.q <= 0.01 and row.ratio == pytest.approx(change)
    assert row.low > 1.05 if change > 1 else row.high < 1 / 1.05
    assert row.mde == pytest.approx(gs.mde(gs.robust_cv([_normal_quantiles(n, cv, 3.0)]), n, n))
    assert (row.verdict, row.note) == (verdict, note)


def _loaded(variant: str, tpots: list[float], busy: float | None) -> dict:
    r = record(variant, _steady(tpots))
    if busy is not None:
        r["load"] = {"other_cpu_fraction": busy}
    return r


@pytest.mark.parametrize(("base_busy", "head_busy", "verdict", "note"), [
    (0.70, 0.10, "inconclusive",
     "improved withheld: the base side ran while other processes used 70% of the CPUs (10% for the other side)"),
    (0.30, 0.10, "improved", ""),  # 20 points more: within the margin
    (0.375, 0.125, "improved", ""),  # exactly the margin (25 points) is not beyond it
    (0.70, None, "improved", ""),  # load recorded on one side only: nothing to compare
    (None, 0.70, "improved", ""),
    (0.10, 0.70, "improved", ""),  # the busier side measured better: load does not explain it
    (float("nan"), 0.10, "improved", ""),  # a damaged figure is no figure
    (True, 0.10, "improved", ""),
])
def test_an_improvement_measured_while_the_base_was_busier_is_withheld(base_busy, head_busy, verdict, note):
    fast = [3.0 * (1 + i / 100) for i in range(5)]
    base = side([_loaded("v0", [1.3 * t for t in fast], base_busy)])
    head = side([_loaded("v0", fast, head_busy)])
    c = compare_sides(base, head, ONE)
    tpot = _rows(c)["v0:tpot_ms"]
    assert (tpot.verdict, tpot.note) == (verdict, note)
    finite = {k: v if isinstance(v, float) and math.isfinite(v) else None for k, v in (("base", base_busy),
                                                                                        ("head", head_busy))}
    assert c.load == finite and json.loads(c.to_json())["load"] == finite


ONE_THREAD = {"torch_threads": 1}


@pytest.mark.parametrize(("factor", "threads", "env", "verdict"), [
    (2.5, ONE_THREAD, {}, "inconclusive"),
    (3.4, ONE_THREAD, {}, "inconclusive"),  # beyond the load's 3.33x, but not by the 5% threshold
    (4.0, ONE_THREAD, {}, "improved"),
    (1 / 4.0, ONE_THREAD, {}, "regressed"),  # head the busy, slow side
    (4.0, {"torch_threads": 2}, {}, "inconclusive"),  # several threads: the load bounds nothing
    (4.0, {"torch_threads": 1, "ort_intra_op_threads": 2}, {}, "inconclusive"),
    (4.0, {}, {}, "inconclusive"),  # threads not recorded
    (4.0, ONE_THREAD, {"cpu_affinity": 1}, "inconclusive"),  # confined to 1 of 2 CPUs: L understates its load
    (4.0, ONE_THREAD, {"cpu_affinity": None}, "inconclusive"),
])
def test_a_change_larger_than_the_load_could_make_stands(factor, threads, env, verdict):
    # The busy side at 70%, the other at 10%: other processes kept every CPU busy at most 70% of the
    # time, so a single-threaded process ran at least 30% of it: a slowdown of at most 3.33x. A 2.5x
    # change the load explains; a 4x one it cannot, and the verdict stands with the bound in its note.
    fast = [3.0 * (1 + i / 100) for i in range(5)]
    busy = _loaded("v0", [max(factor, 1 / factor) * t for t in fast], 0.70)
    quiet = _loaded("v0", fast, 0.10)
    base, head = (busy, quiet) if factor > 1 else (quiet, busy)
    for r in (base, head):
        r["method"] = dict(threads)
    rows = _rows(compare_sides(side([base], {**ENV, **env}), side([head], {**ENV, **env}), ONE))
    who, called = ("base", "improved") if factor > 1 else ("head", "regressed")
    load = f"the {who} side ran while other processes used 70% of the CPUs (10% for the other side)"
    for key in ("v0:tpot_ms", "v0:decode_tokens_per_s"):
        row = rows[key]
        assert row.verdict == verdict, row.note
        if verdict == "inconclusive":
            assert row.note == f"{called} withheld: {load}"
        else:
            size = row.low if row.low > 1 else 1 / row.high
            assert size > 3.5
            assert row.note == (f"{verdict} although {load}: that load explains at most 3.33x, "
                                f"the change is at least {size:.2f}x")


def test_the_load_bound_reads_each_side_and_the_interval_end_nearest_no_change():
    fast = [3.0 * (1 + i / 100) for i in range(5)]

    def pair(factor, busy, base_env=None, head_env=None):
        base, head = _loaded("v0", fast, 0.10), _loaded("v0", [factor * t for t in fast], busy)
        for r in (base, head):
            r["method"] = dict(ONE_THREAD)
        return _rows(compare_sides(side([base], {**ENV, **(base_env or {})}), side([head], {**ENV, **(head_env or {})}),
                                   ONE, allow_env_mismatch=True))["v0:tpot_ms"]

    # 40% load explains at most 1.67x; a 1.9x regression (its interval's low end, between 1 and 2x, is the
    # end nearest no change) is more than that and stands
    row = pair(1.9, 0.40)
    assert 1.75 < row.low < 2 and row.verdict == "regressed" and "explains at most 1.67x" in row.note
    # one side confined to some of the CPUs (either one): the bound holds for neither side
    withheld = ("regressed withheld: the head side ran while other processes used 70% of the CPUs (10% for the "
                "other side)")
    assert pair(4.0, 0.70).verdict == "regressed"
    assert pair(4.0, 0.70, base_env={"cpu_affinity": 1}).note == withheld
    assert pair(4.0, 0.70, head_env={"cpu_affinity": 1}).note == withheld
    # every CPU busy the whole time: no bound at all (1 / (1 - 1) is none), withheld
    row = pair(4.0, 1.0)
    assert row.verdict == "inconclusive" and row.note == ("regressed withheld: the head side ran while other "
                                                          "processes used 100% of the CPUs (10% for the other side)")


def test_a_verdict_withheld_for_load_keeps_its_noisy_mark_before_the_reason():
    fast = [3.0 * (1 + i / 100) for i in range(5)]
    base, head = _loaded("v0", fast, 0.10), _loaded("v0", [1.3 * t for t in fast], 0.70)
    head["noisy"] = True
    row = _rows(compare_sides(side([base]), side([head]), ONE))["v0:tpot_ms"]
    assert row.note == ("marked noisy in head; regressed withheld: the head side ran while other processes used "
                        "70% of the CPUs (10% for the other side)")


def test_figures_below_one_are_measurements_and_are_compared():
    """A TPOT of 0.4 ms is a fast model, not a broken record: only a value <= 0 has no ratio."""
    fast = [0.4 * (1 + i / 100) for i in range(5)]
    rows = _rows(compare_sides(side([record("v0", _steady(fast))]),
                               side([record("v0", _steady([1.3 * t for t in fast]))]), ONE))
    assert rows["v0:tpot_ms"].verdict == "regressed" and rows["v0:tpot_ms"].ratio == pytest.approx(1.3)


def test_a_verdict_that_stands_beside_its_load_keeps_its_noisy_mark():
    fast = [3.0 * (1 + i / 100) for i in range(5)]
    base, head = _loaded("v0", fast, 0.10), _loaded("v0", [4 * t for t in fast], 0.70)
    for r in (base, head):
        r["method"] = dict(ONE_THREAD)
    head["noisy"] = True
    row = _rows(compare_sides(side([base]), side([head]), ONE))["v0:tpot_ms"]
    assert row.verdict == "regressed"
    assert row.note.startswith("marked noisy in head; regressed although the head side ran while other processes")


def test_load_does_not_withhold_a_memory_verdict():
    # Peak memory does not depend on what other processes do with the CPUs.
    fast = _steady([3.0 * (1 + i / 100) for i in range(5)])
    base = record("v0", fast, peak_memory=4.0e8)
    head = record("v0", fast, peak_memory=4.4e8)
    base["load"], head["load"] = {"other_cpu_fraction": 0.05}, {"other_cpu_fraction": 0.90}
    row = _rows(compare_sides(side([base]), side([head]), ONE))["v0:peak_memory_bytes"]
    assert (row.verdict, row.note) == ("regressed", "")


def test_the_load_that_withholds_is_the_cells_own():
    # The run as a whole was as busy on both sides, but v0's head process ran under load.
    fast = [3.0 * (1 + i / 100) for i in range(5)]
    base = side([_loaded("v0", fast, 0.05), _loaded("v1", fast, 0.65)])
    head = side([_loaded("v0", [1.3 * t for t in fast], 0.65), _loaded("v1", fast, 0.05)])
    c = compare_sides(base, head, gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05))
    assert c.load == {"base": pytest.approx(0.35), "head": pytest.approx(0.35)}
    assert _rows(c)["v0:tpot_ms"].note.startswith("regressed withheld: the head side ran while other processes")


def test_noisy_marks_are_noted_on_the_row():
    base, head = _separated("v0", 1.0), _separated("v0", 1.0)
    base[0]["noisy"] = True
    assert _rows(compare_sides(side(base), side(head), ONE))["v0:tpot_ms"].note == "marked noisy in base"
    head[0]["noisy"] = True
    assert _rows(compare_sides(side(base), side(head), ONE))["v0:tpot_ms"].note == "marked noisy in base and head"


def _run(tmp_path, name: str, records: list[dict], **kw):
    return load_side(write_run(tmp_path / name, records, **kw))


def test_status_rows_for_cells_that_did_not_run_ok_on_both_sides(tmp_path):
    ok = record("a", _steady([3.0] * 5))
    base = _run(tmp_path, "base", [ok, record("b", _steady([3.0] * 5)), record("c", {}, status="failed"),
                                   record("d", {}, status="skipped"), record("e", _steady([3.0] * 5))])
    failed = record("b", {}, status="failed")
    failed["error"] = "CUDA error: out of memory\nTraceback ..." + "x" * 400
    skipped = record("e", {}, status="skipped")
    skipped["error"] = "needs CUDA"
    head = _run(tmp_path, "head", [ok, failed, record("c", _steady([3.0] * 5)), record("d", {}, status="failed"),
                                   skipped])
    rows = compare_sides(base, head, ONE).rows
    status = {r.cell.split()[1]: (r.verdict, r.note) for r in rows if r.kind == "status"}
    assert status == {"b": ("regressed", "ok in base, failed in head: CUDA error: out of memory"),
                      "c": ("inconclusive", "failed in base: boom"),
                      "e": ("inconclusive", "skipped in head: needs CUDA")}  # d: not ok on either side, no row
    assert {r.cell.split()[1] for r in rows if r.kind != "status"} == {"a"}
    st = next(r for r in rows if r.kind == "status")
    assert (st.metric, st.label, st.unit, st.direction, st.ratio) == ("status", "status", "", "", None)
    failed["error"] = "y" * 400
    long = compare_sides(base, _run(tmp_path, "head2", [ok, failed, record("c", _steady([3.0] * 5)),
                                                        record("d", {}, status="failed"), skipped]), ONE)
    note = next(r.note for r in long.rows if r.verdict == "regressed")
    assert len(note) == 300 and note.startswith("ok in base, failed in head: yyy")


def test_a_cell_judged_on_its_ok_records_after_a_failed_try(tmp_path):
    ok = record("fp32", _steady([3.0] * 5))
    tries = [{**record("fp32", {}, status="failed"), "error": f"try {i}"} for i in (1, 2)]  # two tries, two records
    side_ = _run(tmp_path, "run", [tries[0], ok, tries[1]])
    (key,) = side_.ok
    assert side_.not_ok == {} and side_.ok[key] == [ok] and side_.keys == {key}
    only_failed = _run(tmp_path, "failed", [record("fp32", {}, status="failed")])
    assert only_failed.ok == {} and list(only_failed.not_ok) == [key]


def test_loading_a_run_names_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path / 'nowhere'} is not a run directory \\(no run.json\\)$"):
        load_side(tmp_path / "nowhere")
    base, head = (write_run(tmp_path / n, [record("fp32", _steady([3.0] * 5))]) for n in ("base", "head"))
    c = compare_runs(base, head, ONE)
    assert (c.base, c.head) == (str(base), str(head)) and len(c.rows) == 5
    del_samples = record("fp32", _steady([3.0] * 5))
    del del_samples["samples"]["tpot_ms"]
    head = write_run(tmp_path / "head2", [del_samples])
    with pytest.raises(InputError, match=f"^cell .*fp32.*: metric tpot_ms has no samples in head \\({head}\\)$"):
        compare_runs(base, head, ONE)
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(InputError, match=f"^{empty} holds no cell records$"):
        load_side(empty)


def test_unmatched_cells_are_listed_eight_at_most():
    base = side([record(f"v{i}", _steady([3.0] * 5)) for i in range(12)])
    head = side([record("v0", _steady([3.0] * 5)), record("w", _steady([3.0] * 5))])
    with pytest.raises(InputError, match=r"^12 cells are in only one run \(use --allow-unmatched to skip them\): "
                                         r".*v1 .*\(only in base\); .*; and 4 more$"):
        compare_sides(base, head, ONE)
    c = compare_sides(base, head, ONE, allow_unmatched=True)
    assert len(c.unmatched) == 12 and c.unmatched[-1].endswith("w cpu generate 1/16/8 (only in head)")
    assert {r.cell.split()[1] for r in c.rows} == {"v0"}


def test_a_comparison_of_no_common_cell_is_refused_not_passed():
    """--allow-unmatched skips the cells in one run only; when that leaves nothing, the gate has nothing to pass."""
    base = side([record("v1", _steady([3.0] * 5))])
    head = side([record("w", _steady([3.0] * 5))])
    with pytest.raises(InputError, match=r"^no cell is recorded in both \S+ and \S+ \(2 in one run only\): "
                                         r"nothing to compare$"):
        compare_sides(base, head, ONE, allow_unmatched=True)


def test_a_comparison_whose_every_common_cell_failed_on_both_sides_says_so():
    """Seen: "no cell is recorded in both", of two runs that recorded every cell, failed."""
    failed = [record(v, {}, status="failed") for v in ("v1", "v2")]
    with pytest.raises(InputError, match=r"^none of the 2 cells recorded in both \S+ and \S+ is ok in either "
                                         r"\(failed or skipped on both sides\): nothing to compare$"):
        compare_sides(side(failed), side([dict(r) for r in failed]), ONE)


@pytest.mark.parametrize("where", ["base", "head"])
def test_a_figure_of_zero_is_refused_rather_than_read_as_an_infinite_change(where):
    bad = record("fp32", _steady([3.0] * 5))
    bad["samples"]["tpot_ms"][2] = 0.0
    good = record("fp32", _steady([3.0] * 5))
    sides = {"base": side([bad if where == "base" else good]), "head": side([bad if where == "head" else good])}
    with pytest.raises(InputError, match=rf"^cell .*fp32.*: metric tpot_ms has a value <= 0 in {where} \(.*\): "
                                         "no ratio can be formed"):
        compare_sides(sides["base"], sides["head"], ONE)


def test_metric_blocks_take_raw_samples_or_one_figure_per_process():
    with_samples = record("fp32", {"tpot_ms": [3, 4]})
    per_process = {"metrics": {"peak_memory_bytes": 4e8}}  # no samples at all
    assert metric_blocks([with_samples, with_samples], "tpot_ms") == [[3.0, 4.0], [3.0, 4.0]]
    assert metric_blocks([with_samples, per_process], "peak_memory_bytes") == [[4e8], [4e8]]
    assert metric_blocks([with_samples, per_process], "tpot_ms") is None  # one process without it: no blocks
    assert metric_blocks([{"metrics": {"tpot_ms": {"p50": 3.0}}, "samples": {}}], "tpot_ms") is None
    assert metric_blocks([{"samples": {"tpot_ms": []}}], "tpot_ms") is None


def test_environment_differences_that_make_speeds_incomparable():
    head = json.loads(json.dumps(ENV))
    head["gpus"] = [{"name": "NVIDIA H200", "driver": "580.1"}]
    head["env_vars"] = {"OMP_NUM_THREADS": "1", "HOME": "/elsewhere"}
    head["torch"] = {"num_threads": 1}
    head["libraries"]["torch"] = "2.14.0+cpu"
    head["hostname"] = "other-host"  # the same machine type elsewhere is comparable
    assert environment_diffs(ENV, head) == [
        "env OMP_NUM_THREADS: None in base, '1' in head",
        "gpu driver: [] in base, ['580.1'] in head",
        "gpus: [] in base, ['NVIDIA H200'] in head",
        "torch: '2.13.0+cpu' in base, '2.14.0+cpu' in head",
        "torch threads: 2 in base, 1 in head"]
    assert environment_diffs(ENV, json.loads(json.dumps(ENV))) == []


def test_the_json_holds_no_non_finite_number_and_says_the_outcome():
    c = Comparison("b", "h", {}, [], False, rows=[
        Row("c1", "tpot_ms", "TPOT ms", "ms", "lower", "speed", "regressed", ratio=math.inf, low=math.nan,
            high=math.inf, cv=0.02, p=0.001),
        Row("c2", "tpot_ms", "TPOT ms", "ms", "lower", "speed", "unchanged", ratio=1.0, low=0.99, high=1.01)])
    text = c.to_json()
    assert text.startswith("{\n") and "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["exit_code"] == 1 and data["counts"] == {"regressed": 1, "improved": 0, "unchanged": 1,
                                                         "inconclusive": 0}
    first = data["rows"][0]
    assert (first["ratio"], first["low"], first["high"], first["cv"], first["p"]) == (None, None, None, 0.02, 0.001)
    assert data["rows"][1]["low"] == 0.99 and data["rows"][1]["verdict"] == "unchanged"


def test_the_minimum_detectable_effect_is_stated_at_the_gates_own_false_discovery_rate():
    # 3 + 4 samples: the smallest p is 2/35 = 0.057, testable at fdr 0.1 but never at the default 0.01.
    base = side([record("fp32", _steady([3.0, 3.1, 2.9]))])
    head = side([record("fp32", _steady([3.0, 3.2, 2.9, 3.1]))])
    row = _rows(compare_sides(base, head, gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.1)))["fp32:tpot_ms"]
    assert row.p is not None and row.mde == gs.mde(row.cv, 3, 4, 0.99, 0.8, 0.1) and math.isfinite(row.mde)
    row = _rows(compare_sides(base, head, ONE))["fp32:tpot_ms"]
    assert (row.p, row.mde) == (None, None)


def test_a_status_row_before_a_measured_one_leaves_it_judged(tmp_path):
    slow = [3.9 * (1 + i / 100) for i in range(5)]
    failed = record("a", {}, status="failed")
    failed["error"] = None
    base = _run(tmp_path, "base", [record("a", _steady([3.0] * 5)), record("b", _steady([3.0 * (1 + i / 100)
                                                                                        for i in range(5)]))])
    head = _run(tmp_path, "head", [failed, record("b", _steady(slow))])
    rows = compare_sides(base, head, ONE).rows
    assert [r.cell.split()[1] for r in rows][0] == "a"  # cells in sorted order: the status row first
    assert (rows[0].verdict, rows[0].note) == ("regressed", "ok in base, failed in head: ")
    assert _rows(compare_sides(base, head, ONE))["b:tpot_ms"].verdict == "regressed"


def test_every_status_row_names_no_metric_figures(tmp_path):
    base = _run(tmp_path, "base", [record("a", {}, status="skipped"), record("b", _steady([3.0] * 5))])
    skipped = record("b", {}, status="skipped")
    skipped["error"] = "z" * 400
    head = _run(tmp_path, "head", [record("a", _steady([3.0] * 5)), skipped])
    rows = compare_sides(base, head, ONE).rows
    assert len(rows) == 2
    for r in rows:
        assert (r.metric, r.label, r.unit, r.direction, r.kind, r.verdict) == ("status", "status", "", "", "status",
                                                                               "inconclusive")
        assert (r.ratio, r.low, r.high, r.p, r.q) == (None,) * 5
    assert rows[0].note == "skipped in base: boom"
    assert len(rows[1].note) == 300 and rows[1].note.startswith("skipped in head: zzz")


def test_differing_environments_withhold_both_directions_unless_allowed():
    other = {**ENV, "cpu_model": "Other CPU"}
    base = side(_separated("v0", 1.0) + _separated("v1", 1.3))
    head = side(_separated("v0", 1.3) + _separated("v1", 1.0), env=other)
    cfg = gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05)
    c = compare_sides(base, head, cfg)
    rows = _rows(c)
    assert not c.env_mismatch_allowed and c.env_diffs == ["cpu_model: 'Test CPU' in base, 'Other CPU' in head"]
    assert (rows["v0:tpot_ms"].verdict, rows["v0:tpot_ms"].note) == ("inconclusive", "regressed withheld: "
                                                                                     "environments differ")
    assert (rows["v1:tpot_ms"].verdict, rows["v1:tpot_ms"].note) == ("inconclusive", "improved withheld: "
                                                                                     "environments differ")
    c = compare_sides(base, head, cfg, allow_env_mismatch=True)
    rows = _rows(c)
    assert c.env_mismatch_allowed and json.loads(c.to_json())["env_mismatch_allowed"] is True
    assert (rows["v0:tpot_ms"].verdict, rows["v1:tpot_ms"].verdict) == ("regressed", "improved")


def _measured(records: list[dict], **method) -> list[dict]:
    for r in records:
        r["method"] = {"clock": "perf_counter_ns", "tpot": "(e2e - ttft) / (new_tokens - 1)",
                       "memory": "peak RSS", **method}
    return records


def test_a_change_of_measuring_method_withholds_the_verdicts_of_the_figures_it_took():
    """A harness whose memory figures began counting more pages moves every cell's memory: that is no
    regression of the code measured. Speed rows, taken the same way, keep theirs."""
    base = side(_measured([record("v0", _steady([3.0] * 5), peak_memory=4.0e8),
                           record("v2", _steady([3.0] * 5), peak_memory=4.4e8)] + _separated("v1", 1.0)))
    head = side(_measured([record("v0", _steady([3.0] * 5), peak_memory=4.4e8),
                           record("v2", _steady([3.0] * 5), peak_memory=4.0e8)] + _separated("v1", 1.3),
                          memory="peak RSS, library pages resident"))
    rows = _rows(compare_sides(base, head, gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05)))
    assert (rows["v0:peak_memory_bytes"].verdict, rows["v0:peak_memory_bytes"].note) == (
        "inconclusive", "regressed withheld: measured differently (method.memory: 'peak RSS' in base, 'peak RSS, "
                        "library pages resident' in head)")
    assert rows["v2:peak_memory_bytes"].note.startswith("improved withheld: measured differently (method.memory")
    assert rows["v1:tpot_ms"].verdict == "regressed"
    allowed = compare_sides(base, head, gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05),
                            allow_env_mismatch=True)
    assert _rows(allowed)["v0:peak_memory_bytes"].verdict == "regressed"
    # A clock changed between the runs: the speed rows are withheld, memory (unchanged here) is not touched.
    head = side(_measured(_separated("v1", 1.3), clock="cuda events"))
    base = side(_measured(_separated("v1", 1.0)))
    rows = _rows(compare_sides(base, head, gs.GateConfig(n_resamples=500, min_processes=1, fdr=0.05)))
    assert rows["v1:tpot_ms"].note == ("regressed withheld: measured differently (method.clock: 'perf_counter_ns' "
                                       "in base, 'cuda events' in head)")


def test_method_difference_reads_every_record_of_a_side_and_only_its_kinds_words():
    from bench.compare import method_difference

    old, new = {"method": {"memory": "a", "clock": "c"}}, {"method": {"memory": "b", "clock": "c"}}
    assert method_difference([old], [old], "memory") is None
    assert method_difference([old], [new], "speed") is None  # the clock is the same
    assert method_difference([old, new], [new], "memory") == "method.memory: 'a / b' in base, 'b' in head"
    assert method_difference([old], [new, old], "memory") == "method.memory: 'a' in base, 'a / b' in head"
    assert method_difference([{}], [{"method": {"memory": "b"}}], "memory") == (
        "method.memory: 'None' in base, 'b' in head")  # records from before the method was written down
    assert method_difference([old], [new], "status") is None


def test_one_process_a_side_withholds_an_improvement_too():
    c = compare_sides(side(_separated("v0", 1.3)), side(_separated("v0", 1.0)), gs.GateConfig(n_resamples=500))
    tpot = _rows(c)["v0:tpot_ms"]
    assert (tpot.verdict, tpot.note) == ("inconclusive", "improved withheld: 1 process(es) on a side, 2 needed to "
                                                         "see noise between processes")


def test_merged_shards_from_differing_environments_are_named_per_side():
    base, head = side(_separated("v0", 1.0)), side(_separated("v0", 1.0))
    head.run["environment_differences"] = ["cpu_model is 'Other' in shard 1"]
    c = compare_sides(base, head, ONE)
    assert c.env_diffs == ["head mixes environments (merged shards or a resume elsewhere): "
                           "cpu_model is 'Other' in shard 1"]
    base.run["environment_differences"] = ["torch threads differ"]
    assert compare_sides(base, head, ONE).env_diffs[0] == \
        "base mixes environments (merged shards or a resume elsewhere): torch threads differ"


def test_runs_without_an_environment_record_compare():
    base, head = side(_separated("v0", 1.0)), side(_separated("v0", 1.0))
    base.run, head.run = {}, {}
    assert compare_sides(base, head, ONE).env_diffs == []
    head.run = {"environment": ENV}
    assert "cpu_model: None in base, 'Test CPU' in head" in compare_sides(base, head, ONE).env_diffs


@pytest.mark.parametrize(("extra", "tail"), [(8, "only in base)"), (9, "only in base); and 1 more")])
def test_at_most_eight_unmatched_cells_are_named(extra, tail):
    base = side([record("v0", _steady([3.0] * 5))] + [record(f"x{i}", _steady([3.0] * 5)) for i in range(extra)])
    with pytest.raises(InputError) as err:
        compare_sides(base, side([record("v0", _steady([3.0] * 5))]), ONE)
    message = str(err.value)
    assert message.endswith(tail) and message.count("(only in base)") == 8


def test_samples_missing_from_the_base_name_the_base_run(tmp_path):
    no_tpot = record("fp32", _steady([3.0] * 5))
    del no_tpot["samples"]["tpot_ms"]
    base = write_run(tmp_path / "base", [no_tpot])
    head = write_run(tmp_path / "head", [record("fp32", _steady([3.0] * 5))])
    with pytest.raises(InputError, match=f"metric tpot_ms has no samples in base \\({base}\\)$"):
        compare_runs(base, head, ONE)


def test_environment_facts_of_partial_records():
    # Records from other tools or older versions lack keys; a GPU may report no name or driver.
    assert environment_diffs({"cpu_model": "x"}, {"cpu_model": "x"}) == []
    two = {"gpus": [{"name": "NVIDIA H200"}, {"driver": "580.1"}]}
    assert environment_diffs(two, {"gpus": [{"name": "NVIDIA H200", "driver": "580.1"}]}) == [
        "gpu driver: ['', '580.1'] in base, ['580.1'] in head",
        "gpus: ['', 'NVIDIA H200'] in base, ['NVIDIA H200'] in head"]


def test_the_comparison_names_the_hosts_each_side_measured_on():
    def on(host, variant="fp32"):
        r = record(variant, _steady([3.0, 3.1, 2.9, 3.0, 3.05]))
        if host:
            r["host"] = host
        return r

    c = compare_sides(side([on("a"), on("b"), on("a", "bf16")]), side([on("c"), on(None, "bf16")]), ONE)
    assert c.hosts == {"base": ["a", "b"], "head": ["c"]}
    assert json.loads(c.to_json())["hosts"] == {"base": ["a", "b"], "head": ["c"]}


def _levels(variant: str, shift: float, d: float = 0.05, device: str = "cpu") -> list[dict]:
    """Three processes of one cell at log levels shift - d, shift, shift + d, five steady repetitions each."""
    out = []
    for level in (-d, 0.0, d):
        r = record(variant, _steady([3.0 * math.exp(shift + level + x) for x in (-0.01, 0, 0.01, 0.005, -0.005)]))
        r["device"] = device
        out.append(r)
    return out


def test_rows_carry_the_pooled_process_noise_into_their_test_and_mde():
    # Four cells, three processes a side 5% apart (sd): v0's head is 16% slower. The repetitions alone call it
    # (p ~ 1e-6); against processes that vary by 5% it is significant at q 0.05 but below the MDE at 95% power.
    base = side([r for i in range(4) for r in _levels(f"v{i}", 0.0)])
    head = side([r for i in range(4) for r in _levels(f"v{i}", 0.15 if i == 0 else 0.0)])
    cfg = gs.GateConfig(n_resamples=500, fdr=0.05, power=0.95)
    c = compare_sides(base, head, cfg)
    rows = _rows(c)
    tpot = rows["v0:tpot_ms"]
    cells = [[[x for x in r["samples"]["tpot_ms"]] for r in s.ok[k]] for s in (base, head) for k in sorted(s.ok)]
    noise = gs.process_noise(cells)
    assert noise.df == tpot.process_df == 16
    assert tpot.process_sd == pytest.approx(0.05, rel=0.01) == math.sqrt(noise.var)
    b, h = metric_blocks(base.ok[tpot.cell], "tpot_ms"), metric_blocks(head.ok[tpot.cell], "tpot_ms")
    assert tpot.p_process == gs.process_p(b, h, noise) > tpot.p_rank and tpot.p == tpot.p_process
    assert tpot.mde == gs.mde(tpot.cv, 15, 15, cfg.level, cfg.power, cfg.fdr, noise.var, (3, 3))
    assert tpot.mde < gs.mde(tpot.cv, 15, 15, cfg.level, cfg.power, cfg.fdr, noise.var)  # 3 processes a side, not 1
    assert tpot.q <= cfg.fdr and tpot.verdict == "inconclusive"
    assert tpot.note == ("regressed withheld: the change is smaller than the MDE (21.3%), the smallest change this "
                         "noise lets the gate detect; whole processes vary by 5.0% (sd)")
    mem = rows["v0:peak_memory_bytes"]
    assert mem.process_sd is None and mem.process_df is None and mem.p_process is None  # not a speed row
    head = side([r for i in range(4) for r in _levels(f"v{i}", 0.25 if i == 0 else 0.0)])
    assert _rows(compare_sides(base, head, cfg))["v0:tpot_ms"].verdict == "regressed"  # 28% is beyond the MDE


def test_process_noise_is_pooled_per_device():
    base = side(_levels("fp32", 0.0, 0.02) + _levels("fp32", 0.0, 0.10, device="cuda"))
    head = side(_levels("fp32", 0.0, 0.02) + _levels("fp32", 0.0, 0.10, device="cuda"))
    sds = {r.cell.split()[2]: r.process_sd for r in compare_sides(base, head, ONE).rows if r.metric == "tpot_ms"}
    assert sds == {"cpu": pytest.approx(0.02, rel=0.1), "cuda": pytest.approx(0.10, rel=0.02)}


def _roofline(gbps, fp32, bf16=None) -> dict:
    matmul = {"float32": {"n": 2048, "tflops": fp32}}
    if bf16 is not None:
        matmul["bfloat16"] = {"n": 2048, "tflops": bf16}
    return {"cpu": {"device": "cpu", "memory": {"bandwidth_gbps": gbps}, "matmul": matmul}}


def test_ceiling_pairs_set_each_ceiling_both_runs_measured_side_by_side():
    from bench.compare import ceiling_pairs

    pairs = ceiling_pairs({"roofline": _roofline(40.0, 0.2, 0.4)}, {"roofline": _roofline(30.0, 0.2)})
    assert pairs == [
        {"device": "cpu", "figure": "copy bandwidth", "unit": "GB/s", "base": 40.0, "head": 30.0, "ratio": 0.75},
        {"device": "cpu", "figure": "float32 matmul", "unit": "TFLOP/s", "base": 0.2, "head": 0.2, "ratio": 1.0},
    ]  # bfloat16 was measured in base only
    hostile = {"cpu": {"memory": {"bandwidth_gbps": True}, "matmul": {"float32": {"tflops": -1}, "x": "y"}},
               "cuda": "broken", "npu": {"memory": {"bandwidth_gbps": float("nan")}},
               "xpu": {"memory": {"bandwidth_gbps": 0}}}
    assert ceiling_pairs({"roofline": hostile}, {"roofline": hostile}) == []
    assert ceiling_pairs({}, {"roofline": None}) == []  # ab and partial runs measure none
    with_int8 = _roofline(40.0, 0.2)
    with_int8["cpu"]["matmul"]["int8"] = {"n": 2048, "tflops": 1.7}
    assert ceiling_pairs({"roofline": with_int8}, {"roofline": with_int8})[2] == {
        "device": "cpu", "figure": "int8 matmul", "unit": "TOP/s", "base": 1.7, "head": 1.7, "ratio": 1.0}


def test_a_comparison_of_runs_on_a_slower_machine_says_so(tmp_path, capsys):
    from bench.cli import main as cli

    rng = np.random.default_rng(0)

    def run(name, roofline):
        path = write_run(tmp_path / name, [record("fp32", _steady(list(3.0 * np.exp(rng.normal(0, 0.02, 10)))))
                                           for _ in range(2)])
        data = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps({**data, "roofline": roofline}))
        return str(path)

    base = run("base", _roofline(42.1, 0.19))
    assert cli(["compare", base, run("same", _roofline(41.0, 0.185)), "--json", str(tmp_path / "c.json")]) == 0
    assert "ceilings" not in capsys.readouterr().out  # within ±5%: nothing to say
    assert json.loads((tmp_path / "c.json").read_text())["ceilings"][0]["ratio"] == pytest.approx(41.0 / 42.1)
    assert cli(["compare", base, run("slow", _roofline(35.0, 0.19))]) == 0
    assert ("The machine's own ceilings, measured at each run's start, differ beyond ±5%: cpu copy bandwidth "
            "42.1 → 35 GB/s (-16.9%). A change of that size in every cell is the machine's, not the code's.") \
        in capsys.readouterr().out
