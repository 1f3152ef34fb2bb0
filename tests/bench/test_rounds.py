"""A cell measured in rounds: one pooled record per cell for reports, select, exports and the exit code."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.cli import main
from bench.results import RUN, read_records, write_json_atomic
from bench.rounds import cell_records, failed_rounds, pool, short_of_rounds
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
    low, high = p["metrics"]["tpot_ms"]["ci95_p50"]
    assert low <= a["metrics"]["tpot_ms"]["p50"] * (1 + 1e-12) and high >= a["metrics"]["tpot_ms"]["p50"]
    assert low <= b["metrics"]["tpot_ms"]["p50"] <= high  # a shift between processes widens the interval
    rates = a["samples"]["decode_tokens_per_s"] + b["samples"]["decode_tokens_per_s"]
    assert p["metrics"]["decode_tokens_per_s"] == pytest.approx(statistics.median(rates))  # the rate: pooled median
    assert p["metrics"]["decode_tokens_per_s_summary"]["n"] == 10
    assert p["metrics"]["peak_memory_bytes"] == a["metrics"]["peak_memory_bytes"]  # once per process: median_low
    assert isinstance(p["metrics"]["peak_memory_bytes"], int)
    assert p["noise"]["n"] == 10 and "round" not in p
    assert a["samples"]["tpot_ms"] != tpot  # the rounds' own records are left as they were


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
