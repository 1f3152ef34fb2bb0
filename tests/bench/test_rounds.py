"""A cell measured in rounds: one pooled record per cell for reports, select, exports and the exit code."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.cli import main
from bench.results import RUN, read_records, write_json_atomic
from bench.rounds import cell_records, configured_rounds, failed_rounds, pool, short_of_rounds
from bench.stats import summarize
from tests.bench.records import record, write_run


def _round(variant: str, index: int, decode: float, peak_mib: float = 400.0, **kw) -> dict:
    r = record(variant, decode=decode, peak_mib=peak_mib, **kw)
    r["round"] = index
    return r


def _failed_round(variant: str, index: int, error: str = "CUDA out of memory\ntraceback") -> dict:
    r = record(variant, status="failed", error=error)
    r["round"] = index
    return r


def _with_rounds(run_dir, rounds: int):
    meta = json.loads((run_dir / RUN).read_text())
    meta["matrix"]["measure"] = {"rounds": rounds}
    write_json_atomic(run_dir / RUN, meta)
    return run_dir


def test_pooled_rounds_summarise_every_repetition_and_span_each_rounds_median():
    a, b = _round("int8", 0, decode=100.0, peak_mib=400), _round("int8", 1, decode=120.0, peak_mib=410)
    a["noise"] = {"metric": "e2e_ms", "target_rel_ci": 0.05}
    b["noise"] = dict(a["noise"])
    p = pool([a, b])
    tpot = a["samples"]["tpot_ms"] + b["samples"]["tpot_ms"]
    assert p["samples"]["tpot_ms"] == tpot and p["metrics"]["tpot_ms"]["n"] == 10
    assert p["metrics"]["tpot_ms"]["p50"] == pytest.approx(statistics.median(tpot))
    # both rounds' medians lie inside the pooled interval: it is the order statistics' own
    assert p["metrics"]["tpot_ms"]["ci95_p50"] == summarize(tpot)["ci95_p50"]
    rates = a["samples"]["decode_tokens_per_s"] + b["samples"]["decode_tokens_per_s"]
    assert p["metrics"]["decode_tokens_per_s"] == pytest.approx(statistics.median(rates))  # the rate: pooled median
    assert p["metrics"]["decode_tokens_per_s_summary"]["n"] == 10
    assert p["metrics"]["peak_memory_bytes"] == a["metrics"]["peak_memory_bytes"]  # once per process: median_low
    assert isinstance(p["metrics"]["peak_memory_bytes"], int)
    assert p["noise"]["n"] == 10 and "round" not in p
    assert a == _round("int8", 0, decode=100.0, peak_mib=400) | {"noise": a["noise"]}  # the rounds are untouched


def test_a_shift_between_processes_widens_the_pooled_interval_to_each_rounds_median():
    # 3 repetitions near 100 ms and 12 near 200 ms: the pooled order-statistic interval alone sits among
    # the second round's values and would claim ~200 ms tightly; it must reach the first round's median
    a, b = _round("fp32", 0, 10.0, reps=3), _round("fp32", 1, 5.0, reps=12)
    alone = summarize(a["samples"]["tpot_ms"] + b["samples"]["tpot_ms"])["ci95_p50"]
    assert alone[0] > a["metrics"]["tpot_ms"]["p50"] * 1.9
    for order in ([a, b], [b, a]):
        p = pool(order)["metrics"]["tpot_ms"]
        assert p["n"] == 15 and p["p50"] == pytest.approx(statistics.median(b["samples"]["tpot_ms"]), rel=0.02)
        assert p["ci95_p50"] == [a["metrics"]["tpot_ms"]["p50"], alone[1]]  # b's median lies inside already


def test_per_process_figures_are_the_median_over_rounds_and_other_fields_the_latest_rounds():
    rounds = [_round("fp32", i, 100.0 + i, peak_mib=400 + 10 * i, roofline_fraction=0.3 + 0.2 * i,
                     drift_meaningful=i == 1) for i in range(2)]
    for i, r in enumerate(rounds):
        r["samples"]["itl_ms"] = [[1.0 + i, 2.0 + i], [3.0 + i, 4.0 + i]]  # per repetition: its gaps
        r["metrics"]["itl_ms"] = {"p50": 2.5 + i, "n": 4, "ci95_p50": [1.0 + i, 4.0 + i]}
        r["metrics"]["ttft_ms"] = {"p50": 10.0, "n": 1}  # a summary without its repetitions: not poolable
        del r["samples"]["ttft_ms"]
    p = pool(rounds)
    assert p["metrics"]["roofline_fraction"] == pytest.approx(0.4)  # floats: their median
    assert p["metrics"]["peak_memory_bytes"] == rounds[0]["metrics"]["peak_memory_bytes"]  # ints: a measured one
    assert p["metrics"]["drift_meaningful"] is True  # not a number: the latest round's
    assert p["metrics"]["itl_ms"]["n"] == 8 and p["metrics"]["itl_ms"]["p50"] == 3.0  # every gap pooled
    assert p["metrics"]["ttft_ms"] == {"p50": 10.0, "n": 1}
    assert p["labels"] == ["ttft_ms: the last round's figures alone (its repetitions are not kept, so the rounds "
                           "cannot be pooled)"]
    del rounds[0]["round"], rounds[1]["round"]  # records of a run without rounds (an ab side, say) pool as well
    assert pool(rounds)["metrics"]["roofline_fraction"] == pytest.approx(0.4)
    del rounds[0]["metrics"]["tpot_ms"]  # a round without the summary: its repetitions still count
    assert pool(rounds)["metrics"]["tpot_ms"]["n"] == 10


def test_a_round_whose_drift_failed_takes_the_drift_another_round_scored():
    """Seen: a cell's latest round timed out while scoring drift; the pooled cell showed "drift failed"
    and no KLD, though its first round had scored it."""
    scored, failed = _round("bf16", 0, 100.0, kld=0.02), _round("bf16", 1, 110.0, kld=None)
    scored["method"]["drift"] = {"protocol_name": "all-but-first"}
    failed.update(drift_ok=False, drift_error="timed out after 240 s (process group killed) while scoring drift\nlog")
    scored["metrics"].update(drift_wall_s=3.0, scored_tokens=8160, prefill_flops_fraction=0.4)  # the last: no drift's
    p = pool([scored, failed])
    assert p["metrics"]["drift_wall_s"] == 3.0 and p["metrics"]["scored_tokens"] == 8160
    assert "prefill_flops_fraction" not in p["metrics"]  # the latest round did not measure it: not taken
    assert p["drift_ok"] is True and p["drift_violations"] == [] and "drift_error" not in p
    assert p["metrics"]["kld_mean"] == 0.02 and p["metrics"]["top1_agreement"] == 0.98
    assert p["method"]["drift"] == {"protocol_name": "all-but-first"}
    assert p["labels"] == ["drift: round 1's figures (the latest round's drift failed: timed out after 240 s "
                           "(process group killed) while scoring drift)"]
    assert p["metrics"]["decode_tokens_per_s_summary"]["n"] == 10  # the speed figures pool as before
    over = _round("bf16", 0, 100.0, kld=0.5)
    over.update(drift_ok=False, drift_violations=["kld_mean 0.5 > 0.1"])
    p = pool([over, failed])  # a round over its budget scored drift: its verdict stands
    assert p["drift_ok"] is False and p["drift_violations"] == ["kld_mean 0.5 > 0.1"]
    assert p["metrics"]["kld_mean"] == 0.5
    p = pool([failed, _round("bf16", 2, 100.0, kld=0.03)])  # the latest round scored it: nothing to take
    assert p["drift_ok"] is True and p["metrics"]["kld_mean"] == 0.03 and p["labels"] == []
    again = dict(failed, round=2)
    p = pool([failed, again])  # no round scored it: drift failed, as each round says
    assert p["drift_ok"] is False and "kld_mean" not in p["metrics"] and p["drift_error"].startswith("timed out")


def test_rounds_written_without_labels_pool_and_the_report_reads_them(tmp_path):
    """labels is not required of a record on read; pooling once indexed it and crashed report, select and export."""
    from bench.report.write import render

    rounds = [_round("fp32", i, 100.0 + i) for i in range(2)]
    for r in rounds:
        del r["labels"], r["samples"]["ttft_ms"]  # a summary without its repetitions: a label is added
    assert pool(rounds)["labels"] == ["ttft_ms: the last round's figures alone (its repetitions are not kept, so "
                                      "the rounds cannot be pooled)"]
    assert all("labels" not in r for r in rounds)  # the rounds themselves are left as read
    run = _with_rounds(write_run(tmp_path / "run", rounds), 2)
    (row,) = json.loads(render(run, "json"))["groups"][0]["rows"]
    assert row["rounds"]["ok"] == 2 and row["metrics"]["tpot_ms"]["n"] == 10


def test_configured_rounds_reads_the_runs_matrix_and_takes_one_for_anything_else():
    assert configured_rounds({"matrix": {"measure": {"rounds": 3}}}) == 3
    assert configured_rounds({"matrix": {"measure": {"rounds": 1}}}) == 1
    for bad in ({}, {"matrix": {}}, {"matrix": {"measure": {}}}, {"matrix": {"measure": {"rounds": True}}},
                {"matrix": {"measure": {"rounds": 0}}}, {"matrix": {"measure": {"rounds": "2"}}},
                {"matrix": {"measure": {"rounds": 2.0}}}):
        assert configured_rounds(bad) == 1, bad


def test_a_single_round_is_its_record_unchanged():
    r = _round("fp32", 0, decode=100.0)
    assert pool([r]) == r and pool([r]) is not r
    assert cell_records([record("fp32")]) == [record("fp32")]  # one round asked, one recorded: no rounds field


def test_cells_say_which_rounds_failed_and_whether_they_are_short_of_rounds():
    recs = [_round("a", 0, 100.0), _failed_round("a", 1), _round("b", 0, 90.0), _failed_round("b", 1),
            _round("b", 2, 95.0), _round("b", 3, 96.0), _failed_round("c", 0), _failed_round("c", 1, "again"),
            _round("a", 2, 104.0)]
    a, b, c = cell_records(recs, rounds=3)
    assert (a["variant"], a["status"], a["rounds"]["ok"], a["rounds"]["configured"]) == ("a", "ok", 2, 3)
    assert a["rounds"]["not_ok"] == [{"round": 1, "status": "failed", "error": "CUDA out of memory"}]
    assert short_of_rounds(a) and failed_rounds(a) == a["rounds"]["not_ok"]
    assert a["metrics"]["tpot_ms"]["n"] == 10
    assert b["rounds"]["ok"] == 3 and not short_of_rounds(b) and failed_rounds(b) == []  # made good since
    assert c["status"] == "failed" and c["error"] == "again" and c["rounds"]["ok"] == 0  # the latest failure
    assert c["rounds"]["not_ok"][1] == {"round": 1, "status": "failed", "error": "again"}


def test_rounds_are_told_where_asked_for_or_where_a_cell_has_several_records():
    one = [_round("a", 0, 100.0)]
    retried = [_failed_round("a", 0), _failed_round("a", 1, "x" * 400), _round("a", 2, 1.0)]
    assert "rounds" not in cell_records(one, rounds=1)[0]
    assert cell_records([_failed_round("a", 0), *one], rounds=1)[0]["rounds"]["ok"] == 1  # a retried cell
    assert cell_records(one, rounds=2)[0]["rounds"] == {"configured": 2, "ok": 1, "not_ok": []}
    [a] = cell_records(retried, rounds=1)  # a resumed run of one round: a failed record, then the ok one
    assert a["status"] == "ok" and a["rounds"]["ok"] == 1 and not short_of_rounds(a)
    assert [x["error"] for x in a["rounds"]["not_ok"]] == ["CUDA out of memory", "x" * 299 + "\u2026"]
    no_error = _failed_round("b", 0)
    no_error["error"] = None
    [b] = cell_records([no_error, _failed_round("b", 1), _failed_round("b", 2, "last")], rounds=3)
    assert b["error"] == "last" and b["rounds"]["not_ok"][0]["error"] is None
    trace = ('Traceback (most recent call last):\n  File "/x/bench/cell.py", line 120, in measure\n'
             "    record.update(_measure(cell, record))\ntorch.OutOfMemoryError: CUDA out of memory")
    [c] = cell_records([_failed_round("c", 0, trace), _round("c", 1, 1.0)], rounds=2)
    assert c["rounds"]["not_ok"][0]["error"] == "torch.OutOfMemoryError: CUDA out of memory"  # the cause, not line 1


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_reports_pool_rounds_and_name_the_cells_short_of_them(tmp_path, fmt):
    from bench.report.write import render

    run = _with_rounds(write_run(tmp_path / "run", [
        _round("fp32", 0, 100.0), _round("int8", 0, 150.0), _round("fp32", 1, 101.0), _failed_round("int8", 1),
        _round("fp32", 2, 99.0), _round("int8", 2, 152.0)]), 3)
    text = render(run, fmt)
    assert "3 per cell, each in a fresh process" in text
    assert "1 of 2 cells have fewer ok rounds than the 3 asked for: tiny int8 cpu generate 1/128/32 (2 ok)" in text
    assert "round 2 failed: CUDA out of memory" in text
    if fmt == "md":
        rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
                if line.startswith("| fp32") or line.startswith("| int8")}
        assert rows["fp32"][3] == "15" and rows["int8"][3] == "10"  # n: every round's repetitions


def test_report_json_csv_and_select_read_the_pooled_cells(tmp_path, capsys):
    from bench.report.write import render

    # int8's last round alone looks fastest; over its three rounds it is slower than fp32
    run = _with_rounds(write_run(tmp_path / "run", [
        _round("fp32", 0, 120.0), _round("int8", 0, 80.0), _round("fp32", 1, 121.0), _round("int8", 1, 82.0),
        _round("fp32", 2, 119.0), _round("int8", 2, 200.0)]), 3)
    rows = {r["variant"]: r for r in json.loads(render(run, "json"))["groups"][0]["rows"]}
    assert rows["int8"]["metrics"]["tpot_ms"]["n"] == 15 and rows["int8"]["rounds"]["ok"] == 3
    assert rows["int8"]["metrics"]["decode_tokens_per_s"]["value"] == pytest.approx(82.0, rel=0.03)
    header, *lines = render(run, "csv").splitlines()
    assert header.split(",")[10] == "rounds_ok" and all(line.split(",")[10] == "3" for line in lines)
    assert main(["select", str(run), "--objective", "decode_tokens_per_s", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["chosen"] == "fp32"


def test_exit_code_fails_a_cell_short_of_its_rounds_through_a_failure():
    from bench.commands.run import _exit_code

    assert _exit_code(cell_records([_round("a", 0, 100.0), _failed_round("a", 1)], rounds=2)) == 1
    assert _exit_code(cell_records([_failed_round("a", 0), _round("a", 1, 100.0), _round("a", 2, 100.0)],
                                   rounds=2)) == 0
    assert _exit_code(cell_records([_round("a", 0, 100.0)], rounds=2)) == 0  # not yet run: not a failure


def test_merged_shards_keep_every_round(tmp_path, capsys):
    from bench.merge import merge_runs

    shards = []
    for i, variant in enumerate(("fp32", "int8"), start=1):
        d = _with_rounds(write_run(tmp_path / variant, [_round(variant, 0, 100.0), _round(variant, 1, 101.0)]), 2)
        meta = json.loads((d / RUN).read_text())
        meta["shard"] = f"{i}/2"
        write_json_atomic(d / RUN, meta)
        shards.append(d)
    merge_runs(shards, tmp_path / "merged")
    assert [(r["variant"], r["round"]) for r in read_records(tmp_path / "merged", latest_only=False)] == [
        ("fp32", 0), ("fp32", 1), ("int8", 0), ("int8", 1)]
    assert main(["compare", str(tmp_path / "merged"), str(tmp_path / "merged"), "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["blocks_base"] for r in rows if r["metric"] == "tpot_ms"} == {2}


def test_exports_carry_every_rounds_repetitions(tmp_path):
    from bench.export import github_action_benchmark, pytest_benchmark_json

    run = _with_rounds(write_run(tmp_path / "run", [_round("fp32", 0, 100.0), _round("fp32", 1, 110.0)]), 2)
    tpot = next(b for b in pytest_benchmark_json(run)["benchmarks"] if b["name"] == "tpot_ms[fp32]")
    assert tpot["stats"]["rounds"] == 10
    decode = next(e for e in github_action_benchmark(run, "bigger") if "decode" in e["name"])
    assert decode["value"] == pytest.approx(statistics.median([*_round("fp32", 0, 100.0)["samples"][
        "decode_tokens_per_s"], *_round("fp32", 1, 110.0)["samples"]["decode_tokens_per_s"]]), rel=1e-3)


def test_the_reports_words_for_rounds_name_each_cell_and_round():
    from bench.report.markdown import note_items, run_facts

    recs = [_round(f"v{i}", 0, 100.0) for i in range(11)] + [_failed_round("v0", 1, "boom\ntrace")]
    no_round = _failed_round("w", 0)
    no_round["round"], no_round["error"] = None, None
    recs += [no_round, _round("w", 1, 90.0), _round("w", 2, 91.0), _failed_round("x", 0, "first"),
             _failed_round("x", 1, "second")]
    cells = cell_records(recs, rounds=2)
    facts = run_facts({"matrix": {"name": "m", "measure": {"rounds": 2}}}, cells)
    assert facts["rounds"] == ("2 per cell, each in a fresh process; the figures pool every ok round's repetitions "
                               "(n counts them all; memory, roofline and drift: the median over rounds)")
    shown = "; ".join(f"tiny v{i} cpu generate 1/128/32 (1 ok)" for i in range(10))
    assert facts["short of rounds"] == (
        f"11 of 13 cells have fewer ok rounds than the 2 asked for: {shown}; and 1 more (their figures pool the "
        "rounds they have; 'infermatrix run --resume' runs the rest)")
    notes = note_items(cells)
    assert ("tiny / v0 / cpu", "round 2 failed: boom") in notes
    assert ("tiny / w / cpu", "a round failed (the cell has its ok rounds since)") in notes
    assert [n for n in notes if n[0] == "tiny / x / cpu"] == [("tiny / x / cpu", "failed: second")]
    assert "rounds" not in run_facts({"matrix": {"name": "m", "measure": {"rounds": 1}}}, cells[-1:])
    ten = run_facts({"matrix": {"name": "m"}}, cell_records([_round(f"v{i}", 0, 1.0) for i in range(10)], 2))
    assert ten["short of rounds"] == (  # ten: every one named, no "more"
        f"10 of 10 cells have fewer ok rounds than the 2 asked for: {shown} (their figures pool the rounds they "
        "have; 'infermatrix run --resume' runs the rest)")


def test_report_json_rows_carry_their_figures_rounds_and_choice(tmp_path):
    from bench.report.write import render

    run = _with_rounds(write_run(tmp_path / "run", [
        _round("fp32", 0, 100.0), _round("int8", 0, 150.0), _round("fp32", 1, 101.0), _failed_round("int8", 1),
        _failed_round("bf16", 0, "no bf16 kernels"), _failed_round("bf16", 1, "no bf16 kernels")]), 2)
    text = render(run, "json")
    assert text.startswith('{\n "run": "handmade",\n "started": "2026-01-01T00:00:00Z",\n '
                           '"ended": "2026-01-01T00:01:00Z"')
    doc = json.loads(text)
    assert set(doc) == {"run", "started", "ended", "unrecorded_cells", "noisy_rel_ci", "groups"}
    assert doc["noisy_rel_ci"] == 0.10 and doc["unrecorded_cells"] is None  # a hand-written run.json
    [group] = doc["groups"]
    assert set(group) == {"model", "device", "scenario", "reference", "speedup_metric", "rows", "selection"}
    assert (group["model"], group["device"], group["reference"]) == ("tiny", "cpu", "fp32")
    rows = {r["variant"]: r for r in group["rows"]}
    assert set(rows["int8"]) == {"variant", "cell_id", "status", "error", "rounds", "drift_ok", "drift_protocol",
                                 "speedup", "speedup_noisy", "metrics"}
    fp32, int8 = rows["fp32"], rows["int8"]
    assert (int8["cell_id"], int8["status"], int8["error"], int8["drift_ok"]) == (
        _round("int8", 0, 1.0)["cell_id"], "ok", None, True)
    assert int8["rounds"] == {"configured": 2, "ok": 1, "not_ok": [{"round": 1, "status": "failed",
                                                                    "error": "CUDA out of memory"}]}
    assert fp32["speedup"] == [1.0, 1.0, 1.0] and int8["speedup"][0] > 1.4
    tpot = fp32["metrics"]["tpot_ms"]
    assert set(tpot) == {"value", "ci95", "n", "noisy", "unit", "direction"}
    assert (tpot["n"], tpot["noisy"], tpot["unit"], tpot["direction"]) == (10, False, "ms", "lower")
    assert tpot["ci95"][0] < tpot["value"] < tpot["ci95"][1]
    assert group["selection"]["chosen"] == "int8"
    bf16 = rows["bf16"]
    assert (bf16["status"], bf16["error"], bf16["speedup"], bf16["metrics"]) == ("failed", "no bf16 kernels", None, {})


def test_report_json_writes_a_figure_that_is_not_finite_as_null():
    import math

    from bench.report.json_report import _clean

    assert [_clean(x) for x in (math.inf, -math.inf, math.nan, 1.5, 0, None)] == [None, None, None, 1.5, 0, None]
