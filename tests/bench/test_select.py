"""select on hand-made records with known answers: ties inside the noise, dominance, constraints, failures."""

from __future__ import annotations

import json
import math

import pytest

from bench.catalogue import metric
from bench.cli import main
from bench.select import constraints_from, format_decisions, parse_where, select
from bench.stats import summarize
from optimize.errors import InputError
from tests.bench.example_records import example_records, first_repetitions
from tests.bench.records import record, write_run


def _one(records, **kw):
    (decision,) = select(records, **kw)
    return decision


def test_a_clearly_faster_variant_wins_and_the_slower_one_is_told_why():
    d = _one([record("fp32", decode=100, kld=0.0, steps=0), record("fast", decode=200, kld=0.001)])
    assert d.chosen == "fast" and not d.ties
    assert d.verdicts["fp32"].outcome == "lost" and "decode tok/s 100.0" in d.verdicts["fp32"].reason
    assert d.front == ["fp32", "fast"]  # fp32 is more accurate, fast is faster: neither dominates


def test_differences_inside_the_noise_are_ties_broken_by_drift_then_memory():
    # 105 vs 100 with +-10% spread: the medians' intervals overlap, so b is not faster than a.
    a = record("a", decode=100, noise=0.1, kld=0.001, peak_mib=300)
    b = record("b", decode=105, noise=0.1, kld=0.001, peak_mib=500)
    d = _one([a, b])
    assert d.chosen == "a" and d.ties == ["b"]
    assert d.verdicts["b"].outcome == "tie" and "a won the tie-break: lower peak memory" in d.verdicts["b"].reason
    assert d.verdicts["a"].reason == ("decode tok/s 100.0 [90.0, 110.0] is tied within noise with b; the choice "
                                      "rests on the tie-break: lower peak memory than b")
    c = record("c", decode=103, noise=0.1, kld=0.0005, peak_mib=900)
    d = _one([a, b, c])
    assert d.chosen == "c" and not d.ties  # tied on speed, clearly less drift: a and b are dominated
    # not "best": b's median is higher, and drift, not speed, put c first
    assert d.verdicts["c"].reason == ("decode tok/s 103.0 [92.7, 113.3] is tied within noise with a, b; the choice "
                                      "rests on the tie-break: lower KLD than a, b")
    assert d.verdicts["a"].reason.startswith("dominated by c") and d.verdicts["b"].reason.startswith("dominated by c")
    assert [d.verdicts[v].dominated_by for v in "abc"] == ["c", "c", None]
    # The same medians measured tightly are a clear win for b.
    d = _one([record("a", decode=100, noise=0.01, kld=0.001), record("b", decode=105, noise=0.01, kld=0.001)])
    assert d.chosen == "b" and not d.ties and d.verdicts["a"].reason.startswith("dominated by b")


def test_a_cell_clearly_beaten_by_another_is_no_candidate_though_it_overlaps_the_best_point():
    """Candidates are the cells no other clearly beats: w overlaps x (the best point) but t is clearly
    faster than w, so w cannot be chosen on its lower drift, nor t be called tied with it."""
    x = record("x", decode=200, noise=0.05, kld=0.05)   # [190, 210]
    w = record("w", decode=189, noise=0.02, kld=0.0)    # [185.2, 192.8]
    t = record("t", decode=199, noise=0.01, kld=0.03)   # [197.0, 201.0]
    d = _one([x, w, t])
    assert d.chosen == "t" and d.ties == []  # x is tied with t on speed, but t has less drift: x is dominated
    assert d.verdicts["w"].outcome == "lost" and "tied" not in d.verdicts["w"].reason
    assert d.verdicts["t"].reason == ("decode tok/s 199.0 [197.0, 201.0] is tied within noise with x; the choice "
                                      "rests on the tie-break: lower KLD than x")


def test_overlapping_intervals_whose_repetitions_rank_apart_are_a_clear_difference():
    """Seen: bf16 and int8 1.29x and 1.52x faster than fp32 by the report's speedup, Mann-Whitney p 0.001, yet
    'tied within noise' with fp32 (a few slow repetitions widened its interval), so fp32 won on drift."""
    from bench.select import rank_p

    fp32 = record("fp32", decode=130, kld=0.0, steps=0, reps=9)
    fast = record("bf16", decode=164, kld=0.001, reps=9)
    fp32["samples"]["decode_tokens_per_s"] = [118, 120, 125, 128, 130, 131, 132, 166, 168]
    fast["samples"]["decode_tokens_per_s"] = [158, 161, 164, 165, 167, 169, 170, 171, 172]
    for r in (fp32, fast):
        r["metrics"]["decode_tokens_per_s_summary"] = summarize(r["samples"]["decode_tokens_per_s"])
        r["metrics"]["decode_tokens_per_s"] = r["metrics"]["decode_tokens_per_s_summary"]["p50"]
    assert fp32["metrics"]["decode_tokens_per_s_summary"]["ci95_p50"][1] > 161  # the intervals overlap
    p = rank_p(fp32, fast, metric("decode_tokens_per_s"))
    assert p < 0.01
    d = _one([fp32, fast])
    assert d.chosen == "bf16" and d.ties == [] and d.front == ["fp32", "bf16"]
    assert d.verdicts["fp32"].reason == (
        f"decode tok/s 130.0 [120.0, 166.0] vs bf16's 167.0 [161.0, 171.0] (intervals overlap, ranks apart: "
        f"Mann-Whitney p {p:.2g}) (on the Pareto front: less drift)")
    # The same figures on 4 repetitions a side rank nothing: tied, and drift chooses.
    few = [record("fp32", decode=130, kld=0.0, steps=0, reps=4), record("bf16", decode=164, kld=0.001, reps=4)]
    assert rank_p(*few, metric("decode_tokens_per_s")) is None and _one(few).chosen == "fp32"


def test_a_rank_test_needs_five_finite_repetitions_a_side_and_p_strictly_below_alpha(monkeypatch):
    from bench import select as sel
    from bench.select import RANK_ALPHA, _compare, rank_p

    m = metric("decode_tokens_per_s")
    a, b = record("a", decode=100, reps=5), record("b", decode=130, reps=5)
    a["samples"]["decode_tokens_per_s"] = [100.0, 101, 102, 103, 104]
    b["samples"]["decode_tokens_per_s"] = [130.0, 131, 132, 133, 134]
    assert rank_p(a, b, m) == pytest.approx(2 / 252)  # five a side suffice: the exact two-sided p of a split
    for bad in (math.nan, math.inf, True, "104"):  # a value no rank can be given: no test
        a["samples"]["decode_tokens_per_s"][-1] = bad
        assert rank_p(a, b, m) is None, bad
    # p equal to alpha is not below it: overlapping intervals stay tied
    x, y = record("x", decode=100, noise=0.05, kld=0.001), record("y", decode=101, noise=0.05, kld=0.001)
    monkeypatch.setattr(sel, "rank_p", lambda *_: RANK_ALPHA)
    assert _compare(x, y, m) == 0
    monkeypatch.setattr(sel, "rank_p", lambda *_: RANK_ALPHA / 2)
    assert _compare(x, y, m) == -1 and _compare(y, x, m) == 1


@pytest.mark.parametrize("few_first", [True, False])
def test_a_figure_on_too_few_repetitions_ties_whichever_side_it_is_on(few_first):
    from bench.select import _compare

    few, many = record("few", decode=180, reps=2), record("many", decode=100, reps=9)
    pair = (few, many) if few_first else (many, few)
    assert _compare(*pair, metric("decode_tokens_per_s")) == 0  # intervals apart, but two repetitions say little


def test_prefill_and_roofline_objectives_judge_noise_as_their_latency_does(tmp_path):
    """prefill tok/s is batch x prompt / TTFT: a 1% TTFT difference inside the noise is a tie either way."""
    a = record("a", decode=100, noise=0.05, kld=0.001, peak_mib=300)
    b = record("b", decode=100, noise=0.05, kld=0.001, peak_mib=500)
    b["samples"]["prefill_tokens_per_s"] = [x * 1.01 for x in b["samples"]["prefill_tokens_per_s"]]
    b["metrics"]["prefill_tokens_per_s"] *= 1.01
    for objective in ("ttft_ms", "prefill_tokens_per_s", "roofline_fraction"):
        d = _one([a, b], objective=objective)
        assert (d.chosen, d.ties) == ("a", ["b"]), objective  # tied; a has the lower peak memory


def test_a_slower_and_less_accurate_variant_is_dominated():
    d = _one([record("good", decode=200, kld=0.001), record("bad", decode=100, kld=0.05),
              record("same-speed-worse-drift", decode=201, noise=0.05, kld=0.1)])
    assert d.chosen == "good"
    assert d.verdicts["bad"].reason.startswith("dominated by good")
    assert d.verdicts["bad"].reason.endswith("decode tok/s 200.0 [196.0, 204.0] vs 100.0 [98.0, 102.0]: better; "
                                             "KLD mean 1.00e-03 vs 5.00e-02: better)")
    # Tied on speed (within noise) and clearly worse on drift: dominated too, though its median is higher.
    assert d.verdicts["same-speed-worse-drift"].reason == (
        "dominated by good (decode tok/s 200.0 [196.0, 204.0] vs 201.0 [190.9, 211.1]: tied within noise; "
        "KLD mean 1.00e-03 vs 1.00e-01: better)")
    assert d.front == ["good"]


def test_every_variant_violating_chooses_nothing_and_exits_1(tmp_path, capsys):
    recs = [record("a", kld=0.02), record("b", kld=0.05, peak_mib=900)]
    d = _one(recs, constraints=constraints_from({"max_kld": 0.01, "max_memory_mib": 800}))
    assert d.chosen is None
    assert d.verdicts["a"].outcome == "violates"
    assert "KLD mean 2.00e-02 > 1.00e-02 (--max-kld)" in d.verdicts["a"].reason
    assert "--max-memory-mib" in d.verdicts["b"].reason and "--max-kld" in d.verdicts["b"].reason
    run = write_run(tmp_path / "run", recs)
    assert main(["select", str(run), "--max-kld", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "no variant satisfies the constraints" in out
    # both variants have both figures: the front is empty because nothing is eligible
    assert ("Pareto front (decode tok/s vs KLD): none: no variant is eligible (each failed, was skipped, lacks a "
            "figure or breaks a constraint)") in out
    assert "random weights" not in out
    for r in recs:
        r["metrics"]["drift_meaningful"] = False  # where a cell stores it
    assert main(["select", str(write_run(tmp_path / "random", recs))]) == 0
    assert "  note: tiny has random weights: its drift checks the mechanics, not accuracy\n" in capsys.readouterr().out


def test_the_serving_memory_bound_judges_the_peak_after_load(tmp_path, capsys):
    """A variant quantized at load holds more while loading than while serving: each flag bounds its own."""
    mib = 2**20
    load_heavy = record("int8-at-load", decode=200, kld=0.001, peak_mib=1500,
                        serving_peak_memory_bytes=600 * mib)
    lean = record("prebuilt", decode=100, kld=0.001, peak_mib=700,
                  serving_peak_memory_bytes=650 * mib)
    older = record("no-window", decode=300, kld=0.001, peak_mib=500)  # a record without the figure
    d = _one([load_heavy, lean, older], constraints=constraints_from({"max_serving_memory_mib": 640}))
    assert d.chosen == "int8-at-load"
    assert d.verdicts["prebuilt"].reason == "serving peak MiB 650.0 > 640.0 (--max-serving-memory-mib)"
    assert d.verdicts["no-window"].outcome == "missing"
    d = _one([load_heavy, lean], constraints=constraints_from({"max_memory_mib": 1000}))
    assert d.chosen == "prebuilt" and d.verdicts["int8-at-load"].outcome == "violates"
    run = write_run(tmp_path / "run", [load_heavy, lean])
    assert main(["select", str(run), "--max-serving-memory-mib", "640", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["chosen"] == "int8-at-load"


def test_missing_metrics_lose_as_not_measured_not_as_zero():
    recs = [record("no-drift", decode=500, kld=None), record("measured", decode=100, kld=0.001)]
    d = _one(recs, constraints=constraints_from({"max_kld": 0.01}))
    assert d.chosen == "measured"
    assert d.verdicts["no-drift"].outcome == "missing" and "no KLD mean measured" in d.verdicts["no-drift"].reason
    # Without a drift constraint the fast one wins; it is simply not on the speed-against-drift front.
    d = _one(recs)
    assert d.chosen == "no-drift" and d.front == ["measured"]
    # A missing objective is named as such.
    d = _one([record("x", decode=None), record("y", decode=10)], objective="ttft_ms")
    assert d.chosen == "y" and "the objective" in d.verdicts["x"].reason


def test_failed_and_skipped_cells_lose_with_their_error():
    d = _one([record("ok", decode=50), record("boom", status="failed", error="Traceback\nRuntimeError: kaput"),
              record("nope", status="skipped", error="needs CUDA")])
    assert d.chosen == "ok"
    assert d.verdicts["boom"].outcome == "failed" and d.verdicts["boom"].reason == "failed: RuntimeError: kaput"
    assert d.verdicts["nope"].outcome == "skipped" and "needs CUDA" in d.verdicts["nope"].reason


def test_objective_direction_comes_from_the_catalogue():
    recs = [record("small", decode=100, peak_mib=300), record("big", decode=300, peak_mib=900)]
    assert _one(recs, objective="peak_memory_bytes").chosen == "small"  # lower is better
    assert _one(recs, objective="decode_tokens_per_s").chosen == "big"
    assert _one(recs, objective="tpot_ms").chosen == "big"  # lower TPOT = the faster decoder


def test_groups_are_decided_separately_and_filters_apply():
    cuda = [record("a", device="cuda", decode=900), record("b", device="cuda", decode=100)]
    cpu = [record("a", decode=10), record("b", decode=90)]
    decisions = select(cpu + cuda)
    assert [(d.group.device, d.chosen) for d in decisions] == [("cpu", "b"), ("cuda", "a")]
    assert [d.chosen for d in select(cpu + cuda, device="cuda")] == ["a"]
    with pytest.raises(InputError, match="--device 'tpu' matches no cell; the run has: cpu, cuda"):
        select(cpu + cuda, device="tpu")
    with pytest.raises(InputError, match="generate:1/128/32"):
        select(cpu, scenario="prefill")
    assert select(cpu, scenario="generate:1/128/32")[0].chosen == "b"


@pytest.mark.parametrize("argv, message", [
    (["--max-kld", "-1"], "--max-kld must be a finite number >= 0"),
    (["--min-top1", "2"], "--min-top1 is a fraction in [0, 1]"),
    (["--max-ttft-ms", "0"], "--max-ttft-ms 0 can hold for no cell: ttft_ms is above 0"),
    (["--objective", "decode_tokens_per_sec"], "did you mean decode_tokens_per_s"),
    (["--objective", "measured_wall_s"], "informational"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    run = write_run(tmp_path / "run", [record("a")])
    assert main(["select", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_json_output_lists_every_variant_with_its_outcome(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record("fp32", decode=100, kld=0.0, steps=0), record("q", decode=300),
                                       record("f", status="failed")])
    assert main(["select", str(run), "--json", "--max-tpot-ms", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    (g,) = out["groups"]
    assert out["satisfied"] and g["chosen"] == "q" and g["objective"] == "decode_tokens_per_s"
    assert {v["variant"]: v["outcome"] for v in g["variants"]} == {"q": "chosen", "fp32": "lost", "f": "failed"}
    assert g["constraints"] == [{"metric": "tpot_ms", "side": "max", "bound": 50.0, "flag": "--max-tpot-ms",
                                 "given": 50.0, "stat": "p50"}]


def _tailed(variant: str, ttft_ms: list[float], decode: float) -> dict:
    from bench.stats import summarize

    return record(variant, decode=decode, kld=0.001, ttft_ms=summarize(ttft_ms))


def test_where_bounds_a_tail_statistic_as_mlperf_bounds_p99_latency(tmp_path, capsys):
    """Equal medians, one with a heavy tail: a p50 bound cannot tell them apart, a p99 bound can."""
    steady = _tailed("steady", [10.0, 10.2, 10.1, 9.9, 10.0], decode=100)
    spiky = _tailed("spiky", [10.0, 10.1, 9.9, 10.0, 60.0], decode=200)
    assert _one([steady, spiky], constraints=constraints_from({"max_ttft_ms": 20})).chosen == "spiky"
    d = _one([steady, spiky], constraints=[parse_where("ttft_ms.p99<=20")])
    assert d.chosen == "steady"
    p99 = spiky["metrics"]["ttft_ms"]["p99"]
    assert d.verdicts["spiky"].reason == f"TTFT ms p99 {p99:.2f} over 5 samples > 20.00 (--where ttft_ms.p99<=20)"
    run = write_run(tmp_path / "run", [steady, spiky])
    assert main(["select", str(run), "--where", "ttft_ms.p99<=20", "--max-kld", "0.01"]) == 0
    assert "constraints: --max-kld 0.01, --where ttft_ms.p99<=20\n" in capsys.readouterr().out
    assert main(["select", str(run), "--where", "ttft_ms.p99<=20", "--where", "decode_tokens_per_s>=50",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["groups"][0]
    assert out["chosen"] == "steady"
    assert out["constraints"] == [
        {"metric": "ttft_ms", "side": "max", "bound": 20.0, "flag": "--where ttft_ms.p99<=20", "given": 20.0,
         "stat": "p99"},
        {"metric": "decode_tokens_per_s", "side": "min", "bound": 50.0, "flag": "--where decode_tokens_per_s>=50",
         "given": 50.0, "stat": None}]


def test_where_bounds_any_catalogue_figure_in_its_stored_unit():
    a = record("a", decode=100, kld=0.001, kld_p99=0.2, peak_mib=300)
    b = record("b", decode=150, kld=0.002, kld_p99=0.05, peak_mib=300)
    c = record("c", decode=300, kld=0.001)  # no kld_p99 in its record
    d = _one([a, b, c], constraints=[parse_where(" kld_p99 <= 0.1 ")])
    assert d.chosen == "b" and d.verdicts["a"].outcome == "violates" and d.verdicts["c"].outcome == "missing"
    assert "KLD p99" in d.verdicts["a"].reason and "(--where kld_p99 <= 0.1)" in d.verdicts["a"].reason
    assert _one([a, b], constraints=[parse_where("decode_tokens_per_s>=120")]).chosen == "b"
    assert _one([a, b], constraints=[parse_where("peak_memory_bytes<=314572800")]).chosen == "b"  # 300 MiB
    assert _one([a, b], constraints=[parse_where("peak_memory_bytes<=314572799")]).chosen is None
    median = a["metrics"]["tpot_ms"]["p50"]
    assert parse_where("tpot_ms.p50<=5").value(a) == parse_where("tpot_ms<=5").value(a) == median
    # a rate's statistic is its per-repetition summary's (decode_tokens_per_s is the median alone)
    slowest = parse_where("decode_tokens_per_s.min>=99")
    assert slowest.value(b) == min(b["samples"]["decode_tokens_per_s"])
    assert parse_where("decode_tokens_per_s.p50>=99").value(b) == b["metrics"]["decode_tokens_per_s"]
    # a generate cell keeps its prefill rate's repetitions but no summary of them: computed from those
    assert "prefill_tokens_per_s_summary" not in b["metrics"]
    assert parse_where("prefill_tokens_per_s.min>=1").value(b) == min(b["samples"]["prefill_tokens_per_s"])
    assert "over 5 samples" in parse_where("prefill_tokens_per_s.max<=1").violation(b)
    assert _one([a, b], constraints=[slowest]).chosen == "b" and _one([a, b], constraints=[slowest]).verdicts[
        "a"].outcome == "violates"


def test_where_on_a_real_run_judges_each_variant_by_its_own_figure(capsys):
    """The committed example run: the pooled inter-token gaps' p99 against a bound between its variants' values."""
    from pathlib import Path

    from bench.results import read_records

    example = Path(__file__).resolve().parents[2] / "reports" / "example"
    records = read_records(example)
    tails = sorted(r["metrics"]["itl_ms"]["p99"] for r in records)
    bound = (tails[3] + tails[4]) / 2  # four variants within it
    (d,) = select(records, constraints=[parse_where(f"itl_ms.p99<={bound}")])
    within = {r["variant"] for r in records if r["metrics"]["itl_ms"]["p99"] <= bound}
    assert len(within) == 4 and d.chosen in within
    violating = {v.variant for v in d.verdicts.values() if v.outcome == "violates"}
    assert violating == {r["variant"] for r in records} - within
    rate = {r["variant"]: r["metrics"]["decode_tokens_per_s"] for r in records}
    best = max(within, key=rate.get)
    # The fastest; or tied with it within noise; or tied on speed and clearly worse on drift: dominated.
    tied_and_worse = f"dominated by {d.chosen} (decode tok/s "
    assert d.chosen == best or d.verdicts[best].outcome == "tie" or (
        d.verdicts[best].reason.startswith(tied_and_worse) and "tied within noise; KLD mean" in d.verdicts[best].reason
        and d.verdicts[best].reason.endswith(": better)")), d.verdicts[best].reason


@pytest.mark.parametrize("where, message", [
    ("ttft_ms.p98<=1", "unknown statistic 'p98'; one of p50, p90, p99, mean, min, max"),
    ("kld_mean.p99<=1", "kld_mean is one figure per cell"),
    ("ttft<=1", "unknown metric 'ttft'"),
    ("ttft_ms<1", "expected METRIC<=VALUE or METRIC.STAT>=VALUE"),
    ("ttft_ms<=nan", "the bound must be a finite number, got 'nan'"),
    ("ttft_ms<=fast", "the bound must be a finite number, got 'fast'"),
    ("roofline_ceilings<=1", "not a number a bound can apply to"),
    ("ttft_ms.p99<=-1", "can hold for no cell: ttft_ms.p99 is above 0"),
    ("tpot_ms<=0", "can hold for no cell: tpot_ms is above 0"),
    ("kld_mean<=-0.001", "can hold for no cell: kld_mean is at least 0"),
    ("top1_agreement>=1.01", "can hold for no cell: top1_agreement is at most 1"),
    ("ttft_ms.max>=2e15", "can hold for no cell: ttft_ms.max is at most 1e+15"),
])
def test_a_bad_where_is_one_line_and_exit_2(tmp_path, capsys, where, message):
    run = write_run(tmp_path / "run", [record("a")])
    assert main(["select", str(run), "--where", where]) == 2
    err = capsys.readouterr().err
    assert f"--where {where!r}" in err and message in err and len(err.strip().splitlines()) == 1, err


def test_bounds_at_the_edge_of_a_metric_range_are_accepted():
    """The edge itself is a question with an answer: KLD 0 (the reference), top-1 agreement 1, any log ratio."""
    for where in ("kld_mean<=0", "top1_agreement>=1", "ttft_ms>=0", "ln_ppl_ratio<=-5", "rss_increase_bytes<=-1",
                  "ttft_ms<=1e-9", "ttft_ms.max>=1e15"):
        assert parse_where(where).key == where.split("<")[0].split(">")[0].split(".")[0]
    assert [c.bound for c in constraints_from({"max_kld": 0.0, "min_top1": 1.0})] == [0.0, 1.0]


def test_an_unknown_where_metric_lists_only_the_metrics_a_bound_applies_to(tmp_path, capsys):
    from bench.catalogue import METRICS

    run = write_run(tmp_path / "run", [record("a")])
    assert main(["select", str(run), "--where", "qqqq<=1"]) == 2  # close to no name: the whole list
    known = capsys.readouterr().err.strip().split("; known: ")[1].split(", ")
    assert "ttft_ms" in known and "kld_p99" in known
    assert sorted(known) == sorted(k for k, m in METRICS.items() if m.shape in ("summary", "scalar"))
    assert "roofline_ceilings" not in known and "drift_meaningful" not in known
    assert main(["select", str(run), "--where", "drift_meaningfull<=1"]) == 2  # a typo of a boolean's name
    hint = capsys.readouterr().err.split("did you mean ")[1]
    assert "drift_meaningful" not in hint and "drift_wall_s" in hint


def _prefill(variant: str, rate: float, noise: float = 0.01) -> dict:
    from bench.stats import summarize
    from tests.bench.records import spread

    rates = spread(rate, noise)
    return record(variant, decode=None, kld=None, steps=0,
                  scenario={"name": "prefill", "batch_size": 1, "prompt_tokens": 256, "new_tokens": 1},
                  ttft_ms=summarize([256 / r * 1e3 for r in rates]), prefill_tokens_per_s=summarize(rates)["p50"],
                  prefill_tokens_per_s_summary=summarize(rates))


def test_a_prefill_group_is_judged_on_the_prompt_pass_by_default(tmp_path, capsys):
    """Its cells generate one token: decode tok/s would leave nothing to choose. An --objective still applies."""
    records = [_prefill("fp32", 6000.0), _prefill("bf16", 9000.0), record("fp32", decode=100, kld=0.0, steps=0),
               record("fast", decode=200, kld=0.001)]
    by_scenario = {d.group.scenario["name"]: d for d in select(records)}
    assert by_scenario["prefill"].objective.key == "prefill_tokens_per_s" and by_scenario["prefill"].chosen == "bf16"
    assert "prefill tok/s 6000 [5940, 6060] vs bf16's 9000" in by_scenario["prefill"].verdicts["fp32"].reason
    assert by_scenario["generate"].objective.key == "decode_tokens_per_s" and by_scenario["generate"].chosen == "fast"
    assert by_scenario["prefill"].front == []  # no drift measured on the sweep: said so, not a bare "none"
    text = format_decisions([by_scenario["prefill"]])
    assert "Pareto front (prefill tok/s vs KLD): none: no variant has both prefill tok/s and KLD" in text
    ttft = {d.group.scenario["name"]: d for d in select(records, objective="ttft_ms")}
    assert ttft["prefill"].chosen == "bf16" and ttft["generate"].objective.key == "ttft_ms"
    run = write_run(tmp_path / "run", records)
    assert main(["select", str(run), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert {g["scenario"]["name"]: g["objective"] for g in groups} == {"prefill": "prefill_tokens_per_s",
                                                                       "generate": "decode_tokens_per_s"}
    from bench.report.write import render

    assert "**recommended: bf16**: best prefill tok/s: 9000" in render(run, "md")


def _golden_records() -> list[dict]:
    recs = [
        record("fp32", decode=100, noise=0.1, kld=0.0, steps=0, peak_mib=300),
        record("wide", decode=104, noise=0.1, kld=0.0, peak_mib=500),  # tied with fp32, same KLD, more memory
        record("nokld", decode=103, noise=0.1, kld=None, peak_mib=100),  # tied, drift not measured
        record("slow", decode=50, noise=0.01, kld=0.02),  # slower and less accurate
        record("crash", status="failed", error="Traceback (most recent call last):\n  x\nRuntimeError: kaput"),
        record("quiet", status="skipped"),
        record("nodecode", decode=None, kld=0.001),
        record("big", decode=300, noise=0.01, kld=0.001, peak_mib=900),
    ]
    recs[5]["error"] = None
    recs[6]["drift_error"] = "Traceback\nValueError: nan logits\n"
    return recs


def test_every_verdict_of_a_constrained_choice_word_for_word():
    """One group with each kind of verdict: the text and the JSON a pipeline reads, exactly."""
    cons = constraints_from({"max_memory_mib": 800}) + [parse_where("kld_mean<=0.05")]
    (d,) = select(_golden_records(), constraints=cons)
    assert format_decisions([d]) == "\n".join([
        "tiny on cpu: generate, batch 1, prompt 128, new 32",
        "  objective: decode tok/s (higher is better); constraints: --max-memory-mib 800, --where kld_mean<=0.05",
        "  chosen: fp32: decode tok/s 100.0 [90.0, 110.0] is tied within noise with wide; the choice rests on the "
        "tie-break: lower peak memory than wide",
        "  - wide [tie]: tied with fp32 within noise on decode tok/s (104.0 [93.6, 114.4] vs 100.0 [90.0, 110.0]); "
        "fp32 won the tie-break: lower peak memory",
        "  - slow [lost]: dominated by fp32 (decode tok/s 100.0 [90.0, 110.0] vs 50.0 [49.5, 50.5]: better; "
        "KLD mean 0.00e+00 vs 2.00e-02: better)",
        "  - big [violates]: peak MiB 900.0 > 800.0 (--max-memory-mib)",
        "  - nokld [missing]: no KLD mean measured (--where kld_mean<=0.05 needs it)",
        "  - nodecode [missing]: no decode tok/s measured (the objective); drift failed: ValueError: nan logits",
        "  - quiet [skipped]: skipped: (no error)",
        "  - crash [failed]: failed: RuntimeError: kaput",
        "  Pareto front (decode tok/s vs KLD): fp32, wide",
        ""])
    data = d.to_dict()
    assert {k: data[k] for k in ("model", "device", "objective", "direction", "chosen", "ties", "pareto_front",
                                 "pareto_axes")} == {
        "model": "tiny", "device": "cpu", "objective": "decode_tokens_per_s", "direction": "higher",
        "chosen": "fp32", "ties": ["wide"], "pareto_front": ["fp32", "wide"],
        "pareto_axes": ["decode_tokens_per_s", "kld_mean"]}
    assert data["scenario"] == {"name": "generate", "batch_size": 1, "prompt_tokens": 128, "new_tokens": 32}
    assert data["constraints"] == [
        {"metric": "peak_memory_bytes", "side": "max", "bound": 800 * 2**20, "flag": "--max-memory-mib",
         "given": 800.0, "stat": None},
        {"metric": "kld_mean", "side": "max", "bound": 0.05, "flag": "--where kld_mean<=0.05", "given": 0.05,
         "stat": None}]
    variants = {v["variant"]: v for v in data["variants"]}
    assert [v["variant"] for v in data["variants"]] == ["fp32", "wide", "slow", "big", "nokld", "nodecode", "quiet",
                                                        "crash"]  # chosen, tie, lost, violates, missing, ...
    assert variants["wide"]["objective"] == 104.0 and variants["wide"]["objective_ci"] == pytest.approx([93.6, 114.4])
    assert variants["slow"]["outcome"] == "lost" and variants["slow"]["objective_ci"] == pytest.approx([49.5, 50.5])
    assert variants["big"] == {"variant": "big", "outcome": "violates",
                               "reason": "peak MiB 900.0 > 800.0 (--max-memory-mib)", "objective": None,
                               "objective_ci": None, "dominated_by": None}
    assert variants["slow"]["dominated_by"] == "fp32" and variants["slow"]["reason"].startswith("dominated by fp32 (")
    assert [v["variant"] for v in data["variants"] if v["dominated_by"]] == ["slow"]


def test_tie_breaks_rank_a_variant_without_drift_last_and_say_why():
    recs = [r for r in _golden_records() if r["variant"] in ("fp32", "wide", "nokld")]
    (d,) = select(recs)
    assert d.chosen == "fp32" and d.ties == ["wide", "nokld"] and d.front == ["fp32", "wide"]
    assert d.verdicts["fp32"].reason.endswith("tie-break: lower peak memory than wide; lower KLD than nokld")
    assert d.verdicts["nokld"].reason.endswith("fp32 won the tie-break: lower KLD")


def test_equal_drift_and_memory_leave_the_tie_to_the_better_point_value_in_either_direction():
    a, b = record("a", decode=100, noise=0.1, kld=0.001), record("b", decode=104, noise=0.1, kld=0.001)
    d = _one([a, b])
    assert d.chosen == "b" and d.verdicts["b"].reason.endswith("tie-break: better objective point value than a")
    assert d.verdicts["a"].outcome == "tie"
    d = _one([a, b], objective="tpot_ms")  # lower is better: b's 9.62 ms against a's 10.0
    assert d.objective.direction == "lower" and d.chosen == "b" and d.verdicts["a"].outcome == "tie"


def test_touching_intervals_are_a_tie_and_compare_is_plus_or_minus_one():
    from bench.catalogue import metric
    from bench.select import _compare, overlap

    assert overlap((1.0, 2.0), (2.0, 3.0)) and overlap((2.0, 3.0), (1.0, 2.0)) and not overlap((1.0, 2.0), (2.5, 3))
    assert not overlap(None, (1.0, 2.0)) and not overlap((1.0, 2.0), None)
    fast, slow = record("fast", decode=200, noise=0.01), record("slow", decode=100, noise=0.01)
    m = metric("decode_tokens_per_s")
    assert (_compare(fast, slow, m), _compare(slow, fast, m), _compare(fast, fast, m)) == (1, -1, 0)


def test_a_lower_bound_holds_at_its_value_and_names_its_side():
    at = constraints_from({"min_top1": 0.99})[0]
    assert at.violation(record("x", kld=0.01)) is None  # top-1 0.99: exactly the bound
    assert at.violation(record("y", kld=0.02)) == "top-1 0.980 < 0.990 (--min-top1)"
    p99 = parse_where("ttft_ms.p99>=100")
    assert p99.violation(record("z")) == "TTFT ms p99 10.20 over 5 samples < 100.00 (--where ttft_ms.p99>=100)"
    broken = record("w")
    broken["metrics"]["ttft_ms"]["p99"] = float("nan")
    assert p99.violation(broken) == "no TTFT ms p99 measured (--where ttft_ms.p99>=100 needs it)"
    broken["metrics"]["ttft_ms"]["p99"] = True
    assert p99.value(broken) is None
    assert parse_where("ttft_ms.p50<=5").value(broken) == 10.0  # p50 is the point value


def test_selecting_from_a_run_without_records_says_so():
    with pytest.raises(InputError, match=r"^the run has no cell records$"):
        select([])
    with pytest.raises(InputError, match=r"^--where 'kld_mean\.p99<=1': kld_mean is one figure per cell; statistics "
                                         r"\(p50, p90, p99, mean, min, max\) apply to metrics with a value per "
                                         r"repetition$"):
        parse_where("kld_mean.p99<=1")


def test_lost_verdicts_say_whether_the_loser_is_on_the_front_and_what_dominated_it():
    fp32 = record("fp32", decode=100, noise=0.01, kld=0.0, steps=0)
    recs = [fp32, record("fast", decode=200, noise=0.01, kld=0.001),
            record("twin", decode=50, noise=0.01, kld=0.0),  # slower, equally exact: dominated, KLD "equal"
            record("blind", decode=40, noise=0.01, kld=None)]  # no KLD: neither on the front nor dominated
    d = _one(recs)
    assert d.verdicts["fast"].reason == "best decode tok/s: 200.0 [198.0, 202.0]"  # no ties: nothing more
    assert d.verdicts["fp32"].reason == ("decode tok/s 100.0 [99.0, 101.0] vs fast's 200.0 [198.0, 202.0] "
                                         "(on the Pareto front: less drift)")
    assert d.verdicts["twin"].reason == ("dominated by fp32 (decode tok/s 100.0 [99.0, 101.0] vs 50.0 [49.5, 50.5]: "
                                         "better; KLD mean 0.00e+00 vs 0.00e+00: equal)")
    assert d.verdicts["blind"].reason == "decode tok/s 40.0 [39.6, 40.4] vs fast's 200.0 [198.0, 202.0]"


def test_two_ties_are_listed_and_each_tie_break_named():
    recs = [r for r in _golden_records() if r["variant"] in ("fp32", "wide", "nokld")]
    (d,) = select(recs)
    assert d.verdicts["fp32"].reason == ("decode tok/s 100.0 [90.0, 110.0] is tied within noise with wide, nokld; "
                                         "the choice rests on the tie-break: lower peak memory than wide; lower KLD "
                                         "than nokld")


def test_ranking_tied_variants_with_and_without_drift_or_memory_figures():
    """A dominated variant with a KLD and one without are ranked against each other before the front one."""
    blind = record("blind", decode=101, noise=0.1, kld=None)
    worse = record("worse", decode=102, noise=0.1, kld=0.05)  # tied on speed, clearly more drift than "best"
    best = record("best", decode=100, noise=0.1, kld=0.001)
    d = _one([blind, worse, best])
    assert d.chosen == "best" and d.ties == ["blind"] and d.verdicts["worse"].reason.startswith("dominated by best")
    no_memory = record("no-memory", decode=100, noise=0.1, kld=0.001)
    del no_memory["metrics"]["peak_memory_bytes"]
    d = _one([no_memory, record("measured", decode=100, noise=0.1, kld=0.001)])
    assert d.chosen == "measured" and d.verdicts["no-memory"].reason.endswith("won the tie-break: lower peak memory")


def test_two_missing_figures_are_both_named_and_long_errors_are_cut():
    cons = [parse_where("kld_mean<=0.05")]
    none = record("none", decode=None, kld=None)
    none["drift_error"] = "Traceback\nFirst: x\n" + "E" * 300
    crash = record("crash", status="failed", error="F" * 300 + "\nsecond")
    d = _one([record("ok", kld=0.0), none, crash], constraints=cons)
    assert d.verdicts["none"].reason == ("no decode tok/s measured (the objective); no KLD mean measured "
                                         "(--where kld_mean<=0.05 needs it); drift failed: " + "E" * 159 + "\u2026")
    assert d.verdicts["crash"].reason == "failed: " + "F" * 199 + "\u2026"


def test_point_bounds_print_no_sample_count_and_stat_bounds_need_the_metric():
    from bench.select import Constraint

    slow = record("slow")  # TTFT p50 10.0 ms over 5 repetitions
    assert constraints_from({"max_ttft_ms": 5})[0].violation(slow) == "TTFT ms 10.00 > 5.00 (--max-ttft-ms)"
    del slow["metrics"]["ttft_ms"]
    assert parse_where("ttft_ms.p99<=5").violation(slow) == "no TTFT ms p99 measured (--where ttft_ms.p99<=5 needs it)"
    # A constraint made in code, without the flag's own value, prints its bound.
    made = Constraint("ttft_ms", 5.0, "max", flag="--max-ttft-ms")
    d = _one([record("a")], constraints=[made])
    assert format_decisions([d]).splitlines()[1] == ("  objective: decode tok/s (higher is better); constraints: "
                                                     "--max-ttft-ms 5")
    assert format_decisions([d]).splitlines()[2] == "  chosen: none: no variant satisfies the constraints"
    assert format_decisions([_one([record("a")])]).splitlines()[1] == "  objective: decode tok/s (higher is better)"


def test_nothing_chosen_says_whether_constraints_or_missing_figures_are_why():
    """Every cell failed, or lacked the objective: "no variant satisfies the constraints" was printed with none."""
    failed = [record("a", status="failed", error="boom"), record("b", decode=None)]
    assert format_decisions([_one(failed)]).splitlines()[2] == (
        "  chosen: none: no variant has the figures to judge (ok, with decode tok/s)")
    d = _one(failed, constraints=constraints_from({"max_ttft_ms": 5}))
    assert format_decisions([d]).splitlines()[2] == (
        "  chosen: none: no variant has the figures to judge (ok, with decode tok/s and every constrained figure)")
    d = _one([*failed, record("c")], constraints=constraints_from({"max_ttft_ms": 5}))
    assert format_decisions([d]).splitlines()[2] == "  chosen: none: no variant satisfies the constraints"


def test_flag_constraints_accept_their_edge_values_and_refuse_the_rest():
    assert constraints_from({"max_kld": 0})[0].bound == 0  # lossless variants only: a legitimate bound
    assert constraints_from({"min_top1": 1})[0].bound == 1
    for bad in ({"max_kld": "x"}, {"max_kld": float("nan")}, {"max_kld": -1}, {"min_top1": 1.5}):
        with pytest.raises(InputError):
            constraints_from(bad)
    with pytest.raises(InputError, match=r"^unknown constraint 'max_speed'; known: max_kld, max_ppl_ratio, "):
        constraints_from({"max_speed": 1})


def test_filters_by_scenario_name_alone_and_name_every_choice_when_none_matches():
    from bench.select import filter_records

    gen, pre = record("a"), record("b", scenario={"name": "prefill", "batch_size": 1, "prompt_tokens": 64,
                                                 "new_tokens": 1})
    assert filter_records([gen, pre], scenario="generate") == [gen]
    with pytest.raises(InputError, match=r"^--scenario 'decode' matches no cell; the run has: "
                                         r"generate:1/128/32, prefill:1/64/1$"):
        filter_records([gen, pre], scenario="decode")
    with pytest.raises(InputError, match=r"^--device 'cuda' matches no cell; the run has: none$"):
        filter_records([], device="cuda")


def test_every_broken_bound_is_named_and_a_drift_objective_is_one_axis():
    from bench.select import filter_records

    cons = constraints_from({"max_kld": 0.01, "max_memory_mib": 100})
    d = _one([record("heavy", kld=0.05, peak_mib=900)], constraints=cons)
    assert d.verdicts["heavy"].reason == ("KLD mean 5.00e-02 > 1.00e-02 (--max-kld); "
                                          "peak MiB 900.0 > 100.0 (--max-memory-mib)")
    d = _one([record("exact", kld=0.001), record("loose", kld=0.05)], objective="kld_mean")
    assert d.chosen == "exact" and d.verdicts["loose"].reason == (
        "dominated by exact (KLD mean 1.00e-03 vs 5.00e-02: better)")  # KLD is the objective: not a second axis
    with pytest.raises(InputError, match=r"^--scenario 'decode' matches no cell; the run has: none$"):
        filter_records([], scenario="decode")


@pytest.mark.parametrize("reps", [1, 2, 4])
def test_figures_on_too_few_repetitions_are_never_told_apart(reps):
    """One repetition gives a zero-width interval: 180 tok/s against 100 would read as a clear win."""
    few = f"{reps} {'repetition is' if reps == 1 else 'repetitions are'} too few for an interval, which needs 5"
    # one repetition has no interval ([x, x] covers nothing): its figure is shown alone
    fast_ci, slow_ci = ("", "") if reps == 1 else (" [176.4, 183.6]", " [98.0, 102.0]")
    d = _one([record("fast", decode=180, kld=0.001, reps=reps), record("slow", decode=100, kld=0.001, reps=reps)])
    assert d.chosen == "fast" and d.ties == ["slow"]  # tied; the better point value breaks the tie
    assert d.verdicts["slow"].reason == (f"not told apart from fast on decode tok/s (100.0{slow_ci} vs 180.0"
                                         f"{fast_ci}; {few}); fast won the tie-break: better objective point value")
    # not "best": the choice says the figures could not be told apart, why, and that the tie-break chose
    assert d.verdicts["fast"].reason == (f"decode tok/s 180.0{fast_ci} could not be told apart from slow ({few}); "
                                         "the choice rests on the tie-break: better objective point value than slow")
    # Tied on speed for want of repetitions, clearly less drift: the choice falls to the tie-break, and the
    # faster median is neither dominated nor called slower.
    d = _one([record("fast", decode=180, kld=0.01, reps=reps), record("slow", decode=100, kld=0.001, reps=reps)])
    assert d.chosen == "slow" and d.ties == ["fast"] and d.front == ["fast", "slow"]
    assert d.verdicts["fast"].outcome == "tie" and d.verdicts["fast"].dominated_by is None
    assert d.verdicts["fast"].reason == (f"not told apart from slow on decode tok/s (180.0{fast_ci} vs 100.0"
                                         f"{slow_ci}; {few}); slow won the tie-break: lower KLD")
    assert d.verdicts["slow"].reason == (f"decode tok/s 100.0{slow_ci} could not be told apart from fast ({few}); "
                                         "the choice rests on the tie-break: lower KLD than fast")
    five = _one([record("fast", decode=180, kld=0.01), record("slow", decode=100, kld=0.001)])
    assert five.chosen == "fast" and not five.ties  # 5 repetitions (93.75%) tell them apart
    assert five.front == ["fast", "slow"] and five.verdicts["fast"].reason == "best decode tok/s: 180.0 [176.4, 183.6]"


def test_a_summary_without_its_count_still_says_why_two_figures_tie():
    a, b = record("a", decode=180, kld=0.001, reps=1), record("b", decode=100, kld=0.001, reps=1)
    for r in (a, b):
        del r["metrics"]["decode_tokens_per_s_summary"]["n"]
    d = _one([a, b])
    assert d.ties == ["b"] and d.verdicts["b"].reason.startswith(
        "not told apart from a on decode tok/s (100.0 vs 180.0; too few repetitions "
        "for an interval, which needs 5)")


def test_a_choice_on_an_unfinished_run_warns_that_cells_are_missing(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record("fp32", kld=0.0, steps=0), record("q8")])
    assert main(["select", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["run_ended"] is True and err == ""
    meta = json.loads((run / "run.json").read_text())
    meta["ended"] = None
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["select", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "  chosen: fp32: " in out
    assert err == (f"infermatrix select: warning: {run}: it has not ended (interrupted, or still running); the "
                   "choice is among the cells recorded so far\n")
    meta.update(ended="2026-01-01T00:01:00Z", missing_shards=["2/2"])
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["select", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["run_ended"] is False and "shards 2/2 were not merged" in err


@pytest.mark.parametrize("few_first", [True, False])
def test_one_side_on_too_few_repetitions_is_enough_to_tie_and_the_fewer_count_is_named(few_first):
    """A 5-repetition figure beside a 1-repetition one: the pair cannot be told apart either way round."""
    fast = record("fast", decode=180, kld=0.001, reps=5)
    slow = record("slow", decode=100, kld=0.001, reps=1)
    d = _one([slow, fast] if few_first else [fast, slow])
    assert d.chosen == "fast" and d.ties == ["slow"]
    few = "1 repetition is too few for an interval, which needs 5"
    assert d.verdicts["slow"].reason == ("not told apart from fast on decode tok/s (100.0 vs 180.0 "
                                         f"[176.4, 183.6]; {few}); fast won the tie-break: better objective point "
                                         "value")
    assert d.verdicts["fast"].reason == ("decode tok/s 180.0 [176.4, 183.6] could not be told apart from slow "
                                         f"({few}); the choice rests on the tie-break: better objective point value "
                                         "than slow")
    wide = record("wide", decode=180, kld=0.001, reps=5, noise=0.5)  # 90..270: the 1-repetition 100 is inside
    d = _one([wide, slow] if few_first else [slow, wide])
    assert d.verdicts["slow"].reason.startswith("tied with wide within noise on decode tok/s")  # overlap says it
    assert "too few" not in d.verdicts["wide"].reason


def test_a_run_on_random_weights_says_so_under_its_choice(tmp_path, capsys):
    """Cells store ``drift_meaningful`` among their metrics; a synthetic model's records say false there."""
    trained = example_records()
    assert {r["metrics"]["drift_meaningful"] for r in trained} == {True} and "drift_meaningful" not in trained[0]
    assert main(["select", str(write_run(tmp_path / "trained", trained))]) == 0
    assert "random weights" not in capsys.readouterr().out
    random = example_records()
    for r in random:
        r["metrics"]["drift_meaningful"] = False
    assert main(["select", str(write_run(tmp_path / "random", random))]) == 0
    out = capsys.readouterr().out
    assert out.endswith("  note: builtin:pycode has random weights: its drift checks the mechanics, not accuracy\n")


def test_on_three_repetitions_the_choice_rests_on_the_tie_break_and_a_faster_median_is_not_dominated(
        tmp_path, capsys):
    """The example's cells as they would read after 3 repetitions: no speed difference can be told apart,
    so nothing is "best" and bf16, whose median is the highest, is not called dominated by fp32.
    """
    records = [first_repetitions(r, 3) for r in example_records() if r["variant"] in ("fp32", "no-kv-cache", "bf16")]
    assert main(["select", str(write_run(tmp_path / "run", records))]) == 0
    few = "3 repetitions are too few for an interval, which needs 5"
    assert capsys.readouterr().out.splitlines()[2:6] == [
        f"  chosen: fp32: decode tok/s 173.1 [168.8, 180.7] could not be told apart from no-kv-cache, bf16 ({few}); "
        "the choice rests on the tie-break: lower peak memory than no-kv-cache; lower KLD than bf16",
        "  - no-kv-cache [tie]: not told apart from fp32 on decode tok/s (49.2 [49.1, 49.5] vs 173.1 [168.8, 180.7]; "
        f"{few}); fp32 won the tie-break: lower peak memory",
        "  - bf16 [tie]: not told apart from fp32 on decode tok/s (197.8 [191.9, 199.2] vs 173.1 [168.8, 180.7]; "
        f"{few}); fp32 won the tie-break: lower KLD",
        "  Pareto front (decode tok/s vs KLD): fp32, no-kv-cache, bf16"]
    # Figures not told apart beside figures tied within noise: each is named with its reason.
    records = [first_repetitions(r, 3) for r in example_records() if r["variant"] in ("fp32", "bf16", "prune-50")]
    (d,) = select(records)
    assert d.verdicts["fp32"].reason == (
        f"decode tok/s 173.1 [168.8, 180.7] could not be told apart from bf16 ({few}) and is tied within noise with "
        "prune-50; the choice rests on the tie-break: lower KLD than bf16, prune-50")
    assert d.verdicts["prune-50"].outcome == "tie" and d.verdicts["prune-50"].dominated_by is None
    # On all 5 repetitions bf16's speed is tied within noise with fp32's: dominated (fp32 clearly less drift).
    (d,) = select([r for r in example_records() if r["variant"] in ("fp32", "bf16")])
    assert d.verdicts["fp32"].reason == ("decode tok/s 176.5 [168.8, 184.0] is tied within noise with bf16; the "
                                         "choice rests on the tie-break: lower KLD than bf16")
    assert d.verdicts["bf16"].reason == ("dominated by fp32 (decode tok/s 176.5 [168.8, 184.0] vs 191.9 [181.9, "
                                         "199.2]: tied within noise; KLD mean 0.00e+00 vs 1.26e-04: better)")


def test_a_tie_won_by_being_on_the_front_says_so_rather_than_lower_drift():
    """w and l tie on speed and nearly on drift; z dominates l (tied speed, clearly less drift), so l is off
    the front and w, on it, wins although l's KLD point is lower: "lower KLD" would be false.
    """
    d = _one([record("w", decode=105, noise=0.05, kld=0.0100), record("l", decode=98, noise=0.03, kld=0.0099),
              record("z", decode=97, noise=0.02, kld=0.001)])
    assert d.front == ["w", "z"] and d.verdicts["l"].dominated_by == "z"
    assert d.verdicts["w"].reason == ("decode tok/s 105.0 [99.8, 110.2] is tied within noise with l; the choice "
                                      "rests on the tie-break: on the Pareto front, unlike l")


@pytest.mark.parametrize("short", ["a", "b"])
def test_a_speed_tie_on_too_few_repetitions_on_either_side_dominates_nothing(short):
    """a is clearly less drifted and level on speed; level on too few repetitions (either side's) is no
    "at least as good", so b stays on the front. On 5 a side the tie counts and a dominates b."""
    d = _one([record("a", decode=100, reps=3 if short == "a" else 5, kld=0.001),
              record("b", decode=100, reps=3 if short == "b" else 5, kld=0.01)])
    assert d.front == ["a", "b"] and d.verdicts["b"].dominated_by is None and d.verdicts["b"].outcome == "tie"
    d = _one([record("a", decode=100, kld=0.001), record("b", decode=100, kld=0.01)])
    assert d.front == ["a"] and d.verdicts["b"].dominated_by == "a"


def test_tie_break_reasons_name_every_loser_and_never_claim_a_difference_there_is_none_of():
    d = _one([record("w", decode=105, noise=0.05, kld=0.0100), record("l", decode=98, noise=0.03, kld=0.0099),
              record("m", decode=99, noise=0.03, kld=0.0098), record("z", decode=97, noise=0.02, kld=0.001)])
    assert d.verdicts["w"].reason == ("decode tok/s 105.0 [99.8, 110.2] is tied within noise with l, m; the choice "
                                      "rests on the tie-break: on the Pareto front, unlike l, m")
    # l's KLD is w's to the last digit: being on the front, not a lower KLD, is why w won
    d = _one([record("w", decode=105, noise=0.05, kld=0.0100), record("l", decode=98, noise=0.03, kld=0.0100),
              record("z", decode=97, noise=0.02, kld=0.001)])
    assert d.verdicts["w"].reason.endswith("the choice rests on the tie-break: on the Pareto front, unlike l")
    d = _one([record("w", decode=100, kld=0.01), record("v", decode=100, kld=0.01)])  # equal in every figure
    assert d.verdicts["w"].reason == ("decode tok/s 100.0 [98.0, 102.0] is tied within noise with v; the choice "
                                      "rests on the tie-break: equal on every tie-break key, listed first (before v)")
    assert d.verdicts["v"].reason == ("tied with w within noise on decode tok/s (100.0 [98.0, 102.0] vs 100.0 "
                                      "[98.0, 102.0]); w won the tie-break: equal on every tie-break key, listed first")

