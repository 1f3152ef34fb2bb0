"""Merging shard runs: which records win, what the merged run.json says, and what is refused."""

from __future__ import annotations

import html
import json
import re

import pytest

from bench.merge import merge_runs
from bench.results import RUN, read_records, write_json_atomic
from optimize.errors import InputError
from tests.bench.gate_helpers import ENV, record, timing_samples, write_run


def _ok(variant: str) -> dict:
    import numpy as np

    return record(variant, timing_samples(np.random.default_rng(0), 5, 0.02))


def _failed(variant: str, error: str = "boom") -> dict:
    r = record(variant, {}, status="failed")
    r["error"] = error
    return r


def _shard(tmp_path, name: str, records: list[dict], index: int, env: dict | None = None, **run_fields):
    d = write_run(tmp_path / name, records, env=env)
    meta = json.loads((d / RUN).read_text())
    meta.update(shard=f"{index}/2", **run_fields)
    for key, value in run_fields.items():
        if value is None:
            del meta[key]
    write_json_atomic(d / RUN, meta)
    return d


def test_shards_merge_into_one_run_that_says_where_it_came_from(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0"), _ok("v1")], 1, started="2026-01-01T00:00:05Z", ended="2026-01-01T00:02:00Z")
    b = _shard(tmp_path, "b", [_ok("v2")], 2, started="2026-01-01T00:00:01Z", ended="2026-01-01T00:01:00Z")
    out = tmp_path / "merged"
    assert merge_runs([a, b], out) == {"cells": 3, "out": str(out), "missing_shards": [], "unfinished": [],
                                       "roofline_differences": []}
    assert [r["variant"] for r in read_records(out)] == ["v0", "v1", "v2"]
    meta = json.loads((out / RUN).read_text())
    assert meta["shard"] is None and meta["merged_from"] == [str(a), str(b)]
    assert meta["shards"] == ["1/2", "2/2"]
    assert (meta["started"], meta["ended"]) == ("2026-01-01T00:00:01Z", "2026-01-01T00:02:00Z")  # the span of both
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["merged_at"])
    assert "environment_differences" not in meta and meta["matrix_hash"] == "m"


def _ceilings(bandwidth_gbps: float, tflops: dict[str, float]) -> dict:
    """A device's ceilings as a run's roofline job stores them in run.json."""
    return {"device": "cpu", "memory": {"copy_bytes": 2**28, "bandwidth_gbps": bandwidth_gbps},
            "matmul": {dtype: {"n": 1024, "tflops": t} for dtype, t in tflops.items()}, "torch_threads": 2}


def test_a_merge_keeps_every_runs_ceilings_and_names_those_that_differ(tmp_path, capsys):
    """Seen: a merge kept shard 1's 15.9 GB/s in run.json while shard 2's fractions were of its own 20.5 GB/s."""
    from bench.cli import main as cli

    one, two = _ceilings(15.9, {"float32": 0.38, "bfloat16": 0.9}), _ceilings(20.5, {"float32": 0.38})
    a = _shard(tmp_path, "a", [_ok("v0")], 1, roofline={"cpu": one})
    b = _shard(tmp_path, "b", [_ok("v1")], 2, roofline={"cpu": two})
    shard2 = read_records(b)
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / RUN).read_text())
    assert meta["roofline"] == {"cpu": one}  # the first run's: what the report shows and a resume reuses
    assert meta["shard_rooflines"] == [{"run": str(a), "shard": "1/2", "roofline": {"cpu": one}},
                                       {"run": str(b), "shard": "2/2", "roofline": {"cpu": two}}]
    differences = [f"{b}: cpu bfloat16 matmul not measured, 0.9 in {a}",
                   f"{b}: cpu copy bandwidth 20.5 GB/s (+28.9%), 15.9 in {a}"]
    assert meta["roofline_differences"] == differences
    assert "environment_differences" not in meta  # the timings the gate compares rest on no ceiling
    assert [r for r in read_records(tmp_path / "m") if r["variant"] == "v1"] == shard2  # figures kept as measured
    assert capsys.readouterr().err == (
        f"infermatrix merge: warning: the runs measured different roofline ceilings ({'; '.join(differences)}): "
        "each record's fractions are of its own run's ceilings (its metrics.roofline_ceilings; run.json: "
        "shard_rooflines, roofline_differences)\n")
    from bench.report.markdown import md_escape, run_facts
    from bench.report.write import render

    fact = (f"{'; '.join(differences)}: each record's roofline fractions are of its own run's ceilings (its "
            "metrics.roofline_ceilings), not all of those above")
    assert run_facts(meta)["ceilings differ"] == fact
    lines = render(tmp_path / "m", "md").splitlines()
    at = lines.index("- cpu ceilings (measured): copy 15.9 GB/s; matmul bfloat16 900 GFLOP/s, float32 380 GFLOP/s")
    assert lines[at + 1] == f"- ceilings differ: {md_escape(fact)}"
    assert f"<dt>ceilings differ</dt><dd>{html.escape(fact)}</dd>" in render(tmp_path / "m", "html")


def test_ceilings_are_compared_with_the_first_run_that_measured_the_device(tmp_path):
    from bench.merge import merged_ceilings

    cpu, gpu = _ceilings(15.9, {"float32": 0.38}), {**_ceilings(3000.0, {"float32": 50.0}), "device": "cuda"}
    same = {**cpu, "torch_threads": 4, "memory": {**cpu["memory"], "copy_bytes": 1}}  # only the divisors count
    runs = [{"shard": "1/3", "roofline": None}, {"shard": "2/3", "roofline": {"cpu": cpu}},
            {"shard": "3/3", "roofline": {"cpu": same, "cuda": gpu}}]
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    assert merged_ceilings(dirs, runs) == {
        "roofline": {"cpu": cpu, "cuda": gpu},  # a device none measured before is taken where it was measured
        "shard_rooflines": [{"run": str(d), "shard": r["shard"], "roofline": r["roofline"]}
                            for d, r in zip(dirs, runs, strict=True)]}
    assert merged_ceilings(dirs[:1], runs[:1]) == {"shard_rooflines": [
        {"run": str(dirs[0]), "shard": "1/3", "roofline": None}]}  # no ceilings anywhere: no roofline made up
    other = {"cpu": _ceilings(15.9, {"float32": 0.41})}
    assert merged_ceilings(dirs, [*runs[:2], {"shard": "3/3", "roofline": other}])["roofline_differences"] == [
        f"{dirs[2]}: cpu float32 matmul 0.41 TFLOP/s (+7.9%), 0.38 in {dirs[1]}"]
    # Seen: every merge warned, in 17 digits, of ceilings 0.1% apart (two measurements are never equal).
    for close in (_ceilings(15.9 * 1.049, {"float32": 0.38 * 0.951}), _ceilings(15.91, {"float32": 0.3797})):
        assert "roofline_differences" not in merged_ceilings(dirs, [*runs[:2], {"shard": "3/3", "roofline": {
            "cpu": close}}])
    beyond = {"cpu": _ceilings(15.9 * 1.051, {"float32": 0.38, "int8": 1.5})}
    assert merged_ceilings(dirs, [*runs[:2], {"shard": "3/3", "roofline": beyond}])["roofline_differences"] == [
        f"{dirs[2]}: cpu int8 matmul 1.5, not measured in {dirs[1]}",
        f"{dirs[2]}: cpu copy bandwidth 16.71 GB/s (+5.1%), 15.9 in {dirs[1]}"]


def test_runs_without_times_merge(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0")], 1, started=None, ended=None)
    b = _shard(tmp_path, "b", [_ok("v1")], 2, started="2026-01-01T00:00:09Z", ended=None)
    merge_runs([a, b], tmp_path / "m1")
    meta = json.loads((tmp_path / "m1" / RUN).read_text())
    assert (meta["started"], meta["ended"]) == ("2026-01-01T00:00:09Z", None)
    merge_runs([a], tmp_path / "m2")
    assert json.loads((tmp_path / "m2" / RUN).read_text())["started"] is None


def test_a_cell_retried_elsewhere_keeps_the_record_where_it_ran_ok(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0"), _failed("v1", "out of memory"), _failed("v2", "first"), _ok("v3")], 1)
    retry = _shard(tmp_path, "retry", [_ok("v1"), _failed("v2", "second"), _failed("v3", "flaky"), _ok("v4")], 2)
    assert merge_runs([a, retry], tmp_path / "m")["cells"] == 5
    merged = {r["variant"]: r for r in read_records(tmp_path / "m")}
    assert list(merged) == ["v0", "v1", "v2", "v3", "v4"]  # in the order first seen
    assert merged["v1"]["status"] == "ok"  # failed in a, ok in the retry
    assert (merged["v2"]["status"], merged["v2"]["error"]) == ("failed", "first")  # failed in both: the first
    assert merged["v3"]["status"] == "ok"  # ok in a, failed later: the ok stays


def test_a_cell_ok_in_two_runs_is_an_overlap_and_nothing_is_written(tmp_path):
    a = _shard(tmp_path, "a", [_failed("v0"), _ok("v1")], 1)
    b = _shard(tmp_path, "b", [_ok("v0"), _ok("v1")], 2)
    out = tmp_path / "m"
    with pytest.raises(InputError, match=f"^cell {_ok('v1')['cell_id']} ran ok in both {a} and {b}: shards overlap$"):
        merge_runs([a, b], out)
    assert not out.exists() and not list(tmp_path.glob("m.tmp*"))


def test_runs_of_different_matrices_are_refused(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    b = _shard(tmp_path, "b", [_ok("v1")], 2, matrix_hash="other")
    message = f"{b} ran a different matrix (other) than {a} (m): refusing to merge"
    with pytest.raises(InputError, match=re.escape(message)):
        merge_runs([a, b], tmp_path / "m")


@pytest.mark.parametrize(("change", "key", "theirs", "ours"), [
    ({"cpu_model": "Other CPU"}, "cpu_model", "'Other CPU'", "'Test CPU'"),
    ({"cpu_logical_cores": 4}, "cpu_logical_cores", "4", "2"),
    ({"gpus": [{"name": "NVIDIA H200"}]}, "gpus", "['NVIDIA H200']", "[]"),
    ({"libraries": {**ENV["libraries"], "torch": "2.14.0+cpu"}}, "lib:torch", "'2.14.0+cpu'", "'2.13.0+cpu'"),
])
def test_an_incompatible_environment_is_refused_unless_allowed_and_then_recorded(tmp_path, change, key, theirs, ours):
    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    b = _shard(tmp_path, "b", [_ok("v1")], 2, env={**ENV, **change})
    with pytest.raises(InputError, match=re.escape(f"{b} ran in an incompatible environment: {key} is {theirs} there, "
                                                   f"{ours} in {a}: refusing to merge")):
        merge_runs([a, b], tmp_path / "m")
    merge_runs([a, b], tmp_path / "m", allow_env_mismatch=True)
    meta = json.loads((tmp_path / "m" / RUN).read_text())
    assert meta["environment_differences"] == [f"{b}: {key} is {theirs}, {ours} in {a}"]


def test_facts_that_do_not_change_the_figures_do_not_stop_a_merge(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    other = {**ENV, "hostname": "runner-2", "cpu_affinity": 1, "libraries": {**ENV["libraries"], "rich": "99"}}
    b = _shard(tmp_path, "b", [_ok("v1")], 2, env=other)
    merge_runs([a, b], tmp_path / "m")
    assert "environment_differences" not in json.loads((tmp_path / "m" / RUN).read_text())
    # A run recorded without its environment compares as unknown on every fact.
    bare = _shard(tmp_path, "bare", [_ok("v2")], 2, environment=None)
    with pytest.raises(InputError, match="incompatible environment: cpu_logical_cores is None there, 2 in"):
        merge_runs([a, bare], tmp_path / "m2")


def test_the_output_must_be_new_or_an_empty_directory(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    with pytest.raises(InputError, match="^merge needs at least one run directory$"):
        merge_runs([], tmp_path / "m")
    with pytest.raises(InputError, match=f"^--out {a} already holds a run$"):
        merge_runs([a], a)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=f"^--out {busy} exists and is not an empty directory$"):
        merge_runs([a], busy)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not an empty directory"):
        merge_runs([a], tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge_runs([a], empty)["cells"] == 1 and (empty / RUN).exists()


def test_differences_from_every_run_are_recorded(tmp_path):
    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    b = _shard(tmp_path, "b", [_ok("v1")], 2, env={**ENV, "cpu_model": "B CPU"})
    c = _shard(tmp_path, "c", [_ok("v2")], 2, env={**ENV, "gpus": [{"name": "NVIDIA H200"}, {"driver": "580"}]})
    merge_runs([a, b, c], tmp_path / "m", allow_env_mismatch=True)
    assert json.loads((tmp_path / "m" / RUN).read_text())["environment_differences"] == [
        f"{b}: cpu_model is 'B CPU', 'Test CPU' in {a}",
        f"{c}: gpus is ['', 'NVIDIA H200'], [] in {a}"]  # a GPU without a name still counts


def test_the_merge_time_is_utc_on_a_host_in_another_zone(tmp_path, monkeypatch):
    import datetime
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        a = _shard(tmp_path, "a", [_ok("v0")], 1)
        merge_runs([a], tmp_path / "m")
        stamp = json.loads((tmp_path / "m" / RUN).read_text())["merged_at"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    merged_at = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - merged_at) < datetime.timedelta(minutes=5)


def test_an_output_filled_by_another_process_meanwhile_is_reported(tmp_path, monkeypatch):
    import bench.merge

    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    out = tmp_path / "m"
    real = bench.merge.build_dir_atomically

    def racing(final, fill):
        final.mkdir()
        (final / "theirs.txt").write_text("another merge")  # lands while ours is being built
        real(final, fill)

    monkeypatch.setattr(bench.merge, "build_dir_atomically", racing)
    with pytest.raises(InputError, match=f"^--out {out} was filled by another process during the merge$"):
        merge_runs([a], out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]  # theirs kept, ours dropped


def test_the_merge_command_takes_a_retried_cell_and_reports_an_overlap(tmp_path, capsys):
    from bench.cli import main as cli

    a = _shard(tmp_path, "a", [_ok("v0"), _failed("v1", "out of memory")], 1)
    retry = _shard(tmp_path, "retry", [_ok("v1")], 2)
    assert cli(["merge", str(a), str(retry), "--out", str(tmp_path / "m")]) == 0
    assert {r["variant"]: r["status"] for r in read_records(tmp_path / "m")} == {"v0": "ok", "v1": "ok"}
    capsys.readouterr()
    assert cli(["merge", str(a), str(retry), str(retry), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"cell {_ok('v1')['cell_id']} ran ok in both {retry} and {retry}: shards overlap")
    assert len(err.splitlines()) == 1 and not (tmp_path / "m2").exists()


def test_a_merge_missing_a_shard_or_of_an_unfinished_one_says_so_everywhere(tmp_path, capsys):
    from bench.cli import main as cli
    from bench.report.write import render

    done = _shard(tmp_path, "a", [_ok("v0")], 1, started="2026-01-01T00:00:05Z", ended="2026-01-01T00:02:00Z")
    assert cli(["merge", str(done), "--out", str(tmp_path / "m")]) == 0
    out, err = capsys.readouterr()
    assert out == f"merged 1 cells into {tmp_path / 'm'}\n"
    assert err == ("infermatrix merge: warning: shard 2/2 not among the runs: its cells have no record in the "
                   "merged run (run.json: missing_shards)\n")
    meta = json.loads((tmp_path / "m" / RUN).read_text())
    assert meta["missing_shards"] == ["2/2"] and meta["ended"] == "2026-01-01T00:02:00Z"
    assert "- missing shards: 2/2: merged without them, their cells have no record" in render(tmp_path / "m", "md")
    # shard 2 was interrupted: the merged run has both shards but is not finished
    cut = _shard(tmp_path, "b", [_ok("v1")], 2, started="2026-01-01T00:00:01Z", ended=None)
    assert cli(["merge", str(done), str(cut), "--out", str(tmp_path / "m2")]) == 0
    err = capsys.readouterr().err
    assert err == (f"infermatrix merge: warning: {cut} never ended (interrupted, or still running): the merged run "
                   f"is unfinished ('infermatrix run --resume {cut}' completes it; merge again after)\n")
    meta = json.loads((tmp_path / "m2" / RUN).read_text())
    assert meta["ended"] is None and "missing_shards" not in meta
    assert "not ended (interrupted, or still running)" in render(tmp_path / "m2", "md")


@pytest.mark.parametrize(("shards", "missing"), [(["1/3", "3/3"], ["2/3"]), (["2/2", "1/2"], []), (["2/2"], ["1/2"]),
                                                 ([None], []), (["1/2", "1/3"], []), (["1/2", None], [])])
def test_missing_shards_are_those_of_the_runs_count_none_ran(shards, missing):
    from bench.merge import missing_shards

    assert missing_shards([{"shard": s} for s in shards]) == missing


GRID = {"name": "grid", "models": ["builtin:pycode"], "devices": ["cpu"], "variants": ["fp32", "bf16"],
        "scenarios": [{"name": "generate", "batch_size": [1, 2], "prompt_tokens": [16], "new_tokens": [4]}]}


def _merged_without(tmp_path, missing: list[str]):
    """A merged run as `merge` leaves it when shards ``missing`` were not among the runs, and its 4 cells."""
    from bench.matrix import expand, parse_matrix
    from bench.orchestrate import start_run

    matrix = parse_matrix(GRID, str(tmp_path / "grid.toml"))
    run_dir = tmp_path / "merged"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local",
              environment={"torch": {"cuda_available": False, "version": "2.13.0+cpu"}})
    meta = json.loads((run_dir / RUN).read_text())
    write_json_atomic(run_dir / RUN, {**meta, "ended": "2026-01-01T00:02:00Z", "missing_shards": missing})
    return run_dir, expand(matrix)


def _append(run_dir, cell, status="ok"):
    from bench.results import append_record
    from tests.bench.records import record as made

    rec = made(cell.recipe.name, status=status, model=cell.model, device=cell.device,
               scenario=cell.scenario.to_dict())
    append_record(run_dir, {**rec, "cell_id": cell.cell_id})


def test_a_resume_keeps_only_the_missing_shards_whose_cells_still_lack_a_record(tmp_path):
    """Seen: a merged run resumed until every cell had its record still said 'missing shards: 2/2' for good."""
    from bench.orchestrate import Shard, finish_run

    run_dir, cells = _merged_without(tmp_path, ["2/3", "3/3"])
    for cell in Shard.parse("1/3").select(cells):
        _append(run_dir, cell)
    finish_run(run_dir)  # an interrupted resume recorded nothing of them yet
    assert json.loads((run_dir / RUN).read_text())["missing_shards"] == ["2/3", "3/3"]
    (two,) = Shard.parse("2/3").select(cells)
    _append(run_dir, two, status="failed")  # a failed cell has its record: its shard is no longer missing
    finish_run(run_dir)
    assert json.loads((run_dir / RUN).read_text())["missing_shards"] == ["3/3"]
    (three,) = Shard.parse("3/3").select(cells)
    _append(run_dir, three)
    finish_run(run_dir)
    meta = json.loads((run_dir / RUN).read_text())
    assert "missing_shards" not in meta and meta["ended"] != "2026-01-01T00:02:00Z"
    assert not list(run_dir.glob("*.tmp*"))  # written whole: a temporary sibling renamed into place


def test_a_hand_written_run_keeps_its_missing_shards_it_cannot_check(tmp_path):
    from bench.orchestrate import shards_still_missing

    run_dir, cells = _merged_without(tmp_path, ["2/2"])
    meta = json.loads((run_dir / RUN).read_text())
    records = [{"cell_id": c.cell_id} for c in cells]
    assert shards_still_missing(meta, records) == []
    assert shards_still_missing({**meta, "matrix_hash": "other"}, records) == ["2/2"]  # cells unknown: kept
    assert shards_still_missing({**meta, "missing_shards": ["two"]}, records) == ["two"]  # not a shard: kept
    assert shards_still_missing({**meta, "missing_shards": None}, records) == []


def test_resuming_a_merged_run_whose_missing_cells_are_all_recorded_says_so(tmp_path, capsys):
    """A resume stopped after its last record, before run.json was written: the next resume settles it."""
    from bench.cli import main as cli

    run_dir, cells = _merged_without(tmp_path, ["2/2"])
    for cell in cells:
        _append(run_dir, cell)
    assert cli(["run", "--resume", str(run_dir), "--quiet", "--no-report"]) == 0
    meta = json.loads((run_dir / RUN).read_text())
    assert "missing_shards" not in meta and meta["ended"] == "2026-01-01T00:02:00Z"  # nothing ran: its end kept
    assert "nothing to run" in capsys.readouterr().err


TINY = """
name = "tiny"
models = ["synthetic:llama-tiny"]
variants = ["fp32"]
devices = ["cpu"]

[[scenarios]]
name = "generate"
batch_size = [1, 2]
prompt_tokens = [8]
new_tokens = [2]

[measure]
warmup = 0
min_reps = 1
max_reps = 1
budget_s = 0
timeout_s = 120
roofline = false

[drift]
enabled = false
"""


@pytest.mark.slow
def test_a_merge_short_of_a_shard_resumed_to_the_end_is_whole_for_report_and_history(tmp_path, cache_dir, capsys):
    """Seen: after 'run --resume' recorded shard 2's cells, report still said 'missing shards: 2/2' and
    'history add' still refused the run, telling the user to resume it."""
    import subprocess
    import sys

    from bench.cli import main as cli
    from bench.report.write import render

    matrix = tmp_path / "tiny.toml"
    matrix.write_text(TINY)
    shard1, merged, db = tmp_path / "sh1", tmp_path / "merged", tmp_path / "h.sqlite"

    def infermatrix(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *args, "--quiet", "--no-report"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    infermatrix("run", str(matrix), "--shard", "1/2", "--out", str(shard1))
    assert cli(["merge", str(shard1), "--out", str(merged)]) == 0
    assert json.loads((merged / RUN).read_text())["missing_shards"] == ["2/2"]
    assert cli(["history", "add", str(merged), "--db", str(db)]) == 2  # short of a shard: refused
    capsys.readouterr()
    infermatrix("run", "--resume", str(merged))
    meta = json.loads((merged / RUN).read_text())
    assert "missing_shards" not in meta and meta["ended"]
    assert [r["status"] for r in read_records(merged)] == ["ok", "ok"]
    report = render(merged, "md")
    assert "missing shards" not in report and "not recorded" not in report
    assert cli(["history", "add", str(merged), "--db", str(db)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("line, why", [
    (json.dumps({**_ok("v1"), "schema_version": 2}), "schema_version: 1 was expected"),
    ('{"cell_id": "b", "status": "ok", "n"', "not valid JSON (JSONDecodeError: Expecting ':' delimiter: line 1 "
                                             "column 37 (char 36))")])
def test_a_complete_line_a_shard_cannot_read_is_refused_naming_it(tmp_path, capsys, line, why):
    """Seen: the line was dropped and the merged run claimed to be whole; the cell it held had no record."""
    from bench.cli import main as cli

    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    b = _shard(tmp_path, "b", [_ok("v2")], 2)
    with (b / "results.jsonl").open("a") as fh:
        fh.write(line + "\n")
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (f"infermatrix merge: error: {b / 'results.jsonl'}:2: not a record ({why}): "
                                       "refusing to merge (the merged run would lack that line's cell)\n")
    assert not (tmp_path / "m").exists()


def test_a_torn_last_line_of_a_shard_is_left_out_with_a_warning(tmp_path):
    from bench.results import CorruptRecordWarning

    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    with (a / "results.jsonl").open("a") as fh:
        fh.write('{"cell_id": "b", "sta')  # a write a crash cut short
    with pytest.warns(CorruptRecordWarning, match=r"skipped 1 corrupt line\(s\): 2 \(not valid JSON"):
        assert merge_runs([a], tmp_path / "m")["cells"] == 1


@pytest.mark.parametrize("where, empty_dir", [("a/sub", False), ("a/empty", True)])
def test_an_output_inside_a_run_it_merges_is_refused(tmp_path, capsys, where, empty_dir):
    from bench.cli import main as cli

    a = _shard(tmp_path, "a", [_ok("v0")], 1)
    b = _shard(tmp_path, "b", [_ok("v1")], 2)
    out = tmp_path / where
    if empty_dir:
        out.mkdir()
    before = sorted(p.name for p in a.iterdir())
    assert cli(["merge", str(b), str(a), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"infermatrix merge: error: --out {str(out)!r} lies in {str(a)!r}, a run it "
                                       "merges: choose a folder outside every run\n")
    assert sorted(p.name for p in a.iterdir()) == before
