"""Hostile or unlucky run directories and output paths, through the commands people run.

Every case is bad input: one line on stderr naming the file and what is wrong, exit 2, and
nothing written; a record that breaks the record schema is skipped with a warning and the
others are used; no output ever replaces a run's own files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest

from bench.cli import main as cli
from bench.results import RESULTS, RUN, CorruptRecordWarning, read_records

EXAMPLE = Path(__file__).resolve().parents[2] / "reports" / "example"


@pytest.fixture
def run(tmp_path) -> Path:
    """A copy of the committed example run (records and run.json only)."""
    d = tmp_path / "run"
    d.mkdir()
    for name in (RUN, RESULTS):
        shutil.copy(EXAMPLE / name, d / name)
    return d


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / RESULTS).read_text().splitlines()]


def _rewrite(run_dir: Path, first_line: str) -> None:
    lines = (run_dir / RESULTS).read_text().splitlines()
    (run_dir / RESULTS).write_text("\n".join([first_line, *lines[1:]]) + "\n")


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


BROKEN = [  # (how record 0 is broken, the reason the warning gives)
    (lambda r: r.pop("variant"), "'variant' is a required property"),
    (lambda r: r.update(scenario="generate"), "scenario: 'generate' is not of type 'object'"),
    (lambda r: r.update(metrics=[1, 2]), "metrics: [1, 2] is not of type 'object'"),
    (lambda r: r.update(samples=None), "samples: None is not of type 'object'"),
    (lambda r: r.update(status="weird"), "status: 'weird' is not one of ['ok', 'failed', 'skipped']"),
    (lambda r: r.update(variant=5), "variant: 5 is not of type 'string'"),
    (lambda r: r["samples"].update(ttft_ms=["a"]), "samples/ttft_ms/0: 'a' is not of type 'number'"),
    (lambda r: r["samples"].update(tpot_ms=[1.0, -2.0]),
     "samples/tpot_ms/1: -2.0 is less than or equal to the minimum of 0"),
    (lambda r: r.update(error=["a"]), "error: ['a'] is not of type 'string', 'null'"),
    (lambda r: r["metrics"]["ttft_ms"].update(p50="fast"), "metrics/ttft_ms/p50: 'fast' is not of type 'number'"),
    # each of these once passed the schema and crashed a reader
    (lambda r: r["samples"].update(ttft_ms=[[1.0, 2.0]]), "samples/ttft_ms/0: [1.0, 2.0] is not of type 'number'"),
    (lambda r: r.update(load=0.5), "load: 0.5 is not of type 'object'"),
    (lambda r: r.update(noise="x"), "noise: 'x' is not of type 'object'"),
    (lambda r: r["method"].update(repeat="x"), "method/repeat: 'x' is not of type 'object'"),
    (lambda r: r["method"].update(drift=[1]), "method/drift: [1] is not of type 'object'"),
    (lambda r: r.update(rounds={"x": 1}), "rounds: 'configured' is a required property"),
]


@pytest.mark.parametrize("break_it, reason", BROKEN)
def test_a_record_breaking_the_schema_is_skipped_with_its_reason_and_every_reader_goes_on(run, tmp_path, capsys,
                                                                                           break_it, reason):
    records = _records(run)
    break_it(records[0])
    _rewrite(run, json.dumps(records[0]))
    out = tmp_path / "out"
    commands = (["report", str(run), "--format", "md,html,csv,json", "--out", str(out)], ["select", str(run)],
                ["export", str(run), "--to", "pytest-benchmark", "--out", str(tmp_path / "b.json")],
                # the skipped record leaves its cell without one: history adds such a run when told to
                ["history", "add", str(run), "--db", str(tmp_path / "h.sqlite"), "--partial"])
    for argv in commands:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cli(argv) == 0, argv
        assert "Traceback" not in capsys.readouterr().err
        (w,) = [w for w in caught if w.category is CorruptRecordWarning]  # once, even for four formats
        assert str(w.message) == (f"{run / RESULTS}: skipped 1 corrupt line(s): 1 ({reason}); the other "
                                  f"{len(records) - 1} records loaded"), argv
    with pytest.warns(CorruptRecordWarning):
        assert len(read_records(run)) == len(records) - 1


@pytest.mark.parametrize("text, reason", [
    ('"ttft_ms": [NaN', "NaN is not a JSON number"), ('"ttft_ms": [Infinity', "Infinity is not a JSON number"),
    ('"ttft_ms": [1e400', "1e400 is out of range"),
    ('"ttft_ms": [' + "9" * 30, "an integer of 30 digits is out of range"),
    ('"ttft_ms": ["\\udc80"', "a string holds a lone surrogate")])
def test_numbers_json_does_not_have_and_lone_surrogates_make_a_line_corrupt(run, capsys, text, reason):
    first = (run / RESULTS).read_text().splitlines()[0]
    _rewrite(run, first.replace('"ttft_ms": [', text + ", ", 1))
    with pytest.warns(UserWarning, match=rf"skipped 1 corrupt line\(s\): 1 \(not valid JSON \(ValueError: "
                                         rf"{reason.replace('(', '.').replace(')', '.')}\)\)"):
        records = read_records(run)
    assert len(records) == len(_records(run)) - 1


def test_a_lone_surrogate_escaped_in_a_name_is_caught_but_a_real_pair_loads(run):
    first = json.loads((run / RESULTS).read_text().splitlines()[0])
    first["variant"] = "smile \U0001f600"
    _rewrite(run, json.dumps(first))  # ensure_ascii: the pair as two escapes
    assert "\\ud83d\\ude00" in (run / RESULTS).read_text()
    assert read_records(run)[0]["variant"] == "smile \U0001f600"


@pytest.mark.parametrize("make", ["dir", "fifo", "dev-zero"])
@pytest.mark.parametrize("name", [RESULTS, RUN])
def test_run_files_that_are_no_regular_file_are_refused_before_reading(run, capsys, make, name):
    path = run / name
    path.unlink()
    if make == "dir":
        path.mkdir()
    elif make == "fifo":
        os.mkfifo(path)  # reading it would wait forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    for argv in (["report", str(run)], ["select", str(run)], ["compare", str(run), str(run)],
                 ["export", str(run), "--to", "pytest-benchmark"]):
        err = _one_line_error(capsys, cli(argv))
        assert err.endswith(f"{path}: the run's records file is not a regular file") if name == RESULTS else \
            err.endswith(f"{path}: the run description is not a regular file"), err


@pytest.mark.parametrize("change, where", [
    (lambda j: j.update(environment=None), "environment: None is not of type 'object'"),
    (lambda j: j.update(environment="x"), "environment: 'x' is not of type 'object'"),
    (lambda j: j.update(roofline="fast"), "roofline: 'fast' is not of type 'object', 'null'"),
    (lambda j: j["roofline"]["cpu"]["memory"].update(bandwidth_gbps="fast"),
     "roofline/cpu/memory/bandwidth_gbps: 'fast' is not of type 'number'"),
    (lambda j: j["environment"].update(libraries=[]), "environment/libraries: [] is not of type 'object'"),
    # each of these once passed the schema and crashed a reader
    (lambda j: j["environment"].update(env_vars=["x"]), "environment/env_vars: ['x'] is not of type 'object'"),
    (lambda j: j["environment"].update(torch="2.1"), "environment/torch: '2.1' is not of type 'object', 'null'"),
    (lambda j: j["environment"].update(gpus=[{"name": 1}]), "environment/gpus/0/name: 1 is not of type 'string'"),
    (lambda j: j.update(missing_shards=[2]), "missing_shards/0: 2 is not of type 'string'"),
    (lambda j: j["matrix"].update(measure=[1]), "matrix/measure: [1] is not of type 'object'")])
def test_a_run_description_of_the_wrong_shape_is_named_with_where_it_breaks(run, capsys, change, where):
    data = json.loads((run / RUN).read_text())
    change(data)
    (run / RUN).write_text(json.dumps(data))
    for argv in (["report", str(run)], ["export", str(run), "--to", "pytest-benchmark"],
                 ["compare", str(run), str(run)], ["select", str(run)],
                 ["history", "add", str(run), "--db", str(run / "h.sqlite")]):
        err = _one_line_error(capsys, cli(argv))
        assert err.endswith(f"{run / RUN} is not a run description ({where}); it cannot be resumed or reported"), err


@pytest.mark.parametrize("argv", [
    ["report", "{run}", "--format", "csv", "--out", "{run}/results.jsonl"],
    ["report", "{run}", "--format", "json", "--out", "{run}/run.json"],
    ["export", "{run}", "--to", "pytest-benchmark", "--out", "{run}/results.jsonl"],
    ["compare", "{run}", "{run}", "--min-processes", "1", "--json", "{run}/run.json"],
    ["compare", "{run}", "{run}", "--min-processes", "1", "--markdown", "{run}/results.jsonl"],
    ["history", "add", "{run}", "--db", "{run}/results.jsonl"]])
def test_no_output_replaces_or_appends_to_a_runs_own_files(run, capsys, argv):
    before = {name: (run / name).read_bytes() for name in (RUN, RESULTS)}
    err = _one_line_error(capsys, cli([a.format(run=run) for a in argv]))
    assert "that is the run's own" in err and err.endswith("; give another file"), err
    assert {name: (run / name).read_bytes() for name in (RUN, RESULTS)} == before


def test_unwritable_outputs_are_bad_input_named_before_any_work(run, tmp_path, capsys, monkeypatch):
    a_dir, a_file = tmp_path / "adir", tmp_path / "afile"
    a_dir.mkdir()
    a_file.write_text("x")
    cases = [
        (["report", str(run), "--out", str(a_dir)], f"--out {a_dir} is a directory; give a file"),
        (["report", str(run), "--format", "md,html", "--out", str(a_file)], f"--out {a_file} is not a directory"),
        (["report", str(run), "--out", str(a_file / "r.md")],
         f"--out {a_file / 'r.md'}: its folder {a_file} is not a directory"),
        (["export", str(run), "--to", "pytest-benchmark", "--out", str(a_dir)], f"--out {a_dir} is a directory"),
        (["compare", str(run), str(run), "--json", str(a_dir)], f"--json {a_dir} is a directory; give a file"),
        (["history", "add", str(run), "--db", str(a_dir)], f"--db {a_dir} is a directory; give a file"),
        (["history", "add", str(run), "--db", str(a_file)], f"--db {a_file}: not an infermatrix history database"),
    ]
    for argv, needle in cases:
        assert needle in _one_line_error(capsys, cli(argv)), argv
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(a_dir))
    err = _one_line_error(capsys, cli(["compare", str(run), str(run)]))
    assert f"GITHUB_STEP_SUMMARY {a_dir} is a directory" in err  # exit 2, not the gate's 1, and before comparing
    assert a_file.read_text() == "x" and list(a_dir.iterdir()) == []


def test_a_write_that_fails_midway_is_exit_2_not_a_regression(run, capsys):
    """/dev/full takes the open and refuses the bytes: the gate's summary is printed, the exit code says bad input."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    code = cli(["compare", str(run), str(run), "--min-processes", "1", "--markdown", "/dev/full"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("infermatrix compare: error: --markdown /dev/full: could not append the "
                                         "summary (No space left on device)"), err


def test_reports_that_cannot_be_rendered_leave_no_folder_and_no_partial_set(run, tmp_path, capsys):
    data = json.loads((run / RUN).read_text())
    data.pop("matrix")
    (run / RUN).write_text(json.dumps(data))
    out = tmp_path / "reports"
    _one_line_error(capsys, cli(["report", str(run), "--format", "md,html,csv", "--out", str(out)]))
    assert not out.exists()


def test_history_show_never_writes_into_the_file_it_reads(tmp_path, capsys):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    err = _one_line_error(capsys, cli(["history", "show", "--db", str(empty), "--metric", "tpot_ms"]))
    assert f"--db {empty}: not an infermatrix history database (an empty file)" in err and empty.read_bytes() == b""


def test_history_add_refuses_an_empty_file_rather_than_start_a_new_database_in_it(run, tmp_path, capsys):
    """A history artifact whose download failed is 0 bytes: taken as a new database, every earlier run is lost
    at the next upload. A missing file is a new database."""
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    err = _one_line_error(capsys, cli(["history", "add", str(run), "--db", str(empty)]))
    assert f"--db {empty}: not an infermatrix history database (an empty file)" in err and empty.read_bytes() == b""


@pytest.mark.parametrize("to", ["pytest-benchmark", "github-action-benchmark"])
def test_exporting_a_run_with_nothing_to_export_is_refused_not_an_empty_file(tmp_path, capsys, to):
    from tests.bench.records import record, write_run

    run = write_run(tmp_path / "run", [record("fp32", status="failed")])
    out = tmp_path / "bench.json"
    err = _one_line_error(capsys, cli(["export", str(run), "--to", to, "--out", str(out)]))
    assert err.endswith(f"{run} has no ok cell with figures to export") and not out.exists()


def test_an_output_that_is_a_device_is_written_in_place_not_replaced(run, capfd):
    """``--out /dev/stdout`` writes to the stream; renaming a temporary over it would replace the link itself."""
    if not os.path.islink("/dev/stdout"):
        pytest.skip("no /dev/stdout link on this system")
    target = os.readlink("/dev/stdout")
    assert cli(["report", str(run), "--out", "/dev/stdout"]) == 0
    assert capfd.readouterr().out.startswith("# infermatrix run `")
    assert os.path.islink("/dev/stdout") and os.readlink("/dev/stdout") == target  # the link is still the link


def test_merge_into_a_folder_that_cannot_take_it_is_refused_before_reading(run, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))  # root
    err = _one_line_error(capsys, cli(["merge", str(run), "--out", str(ro / "m")]))
    assert err.endswith(f"--out {ro / 'm'}: its folder {ro} is not writable") and list(ro.iterdir()) == []


@pytest.mark.parametrize("samples, reason", [
    ([0.0, 1.0], "samples/tpot_ms/0: 0.0 is less than or equal to the minimum of 0"),
    ([1e308, 1.0], "samples/tpot_ms/0: 1e+308 is greater than the maximum of 1000000000000000")])
def test_times_of_zero_or_beyond_any_machine_make_a_record_corrupt(run, samples, reason):
    records = _records(run)
    records[0]["samples"]["tpot_ms"] = samples
    _rewrite(run, json.dumps(records[0]))
    with pytest.warns(CorruptRecordWarning, match=re.escape(f"1 ({reason})")):
        assert len(read_records(run)) == len(records) - 1


def test_resume_of_a_run_recorded_without_an_environment_runs_on(run, capsys):
    data = json.loads((run / RUN).read_text())
    data.pop("environment")
    (run / RUN).write_text(json.dumps(data))
    before = (run / RESULTS).read_bytes()
    assert cli(["run", "--resume", str(run), "--quiet"]) == 0  # every cell is recorded ok: nothing to run
    assert (run / RESULTS).read_bytes() == before


def test_a_compare_of_records_breaking_the_schema_skips_them_instead_of_crashing(run, capsys):
    """Seen: samples of lists and a load that is no table passed the schema; compare crashed with exit 1."""
    records = _records(run)
    records[0]["samples"]["ttft_ms"] = [[1.0, 2.0]]
    records[1]["load"] = 0.5
    (run / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(CorruptRecordWarning, match=r"skipped 2 corrupt line\(s\): 1 \(samples/ttft_ms/0: .* 2 \(load"):
        code = cli(["compare", str(EXAMPLE), str(run), "--allow-unmatched", "--min-processes", "1"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err


def test_a_run_concatenated_with_itself_compares_as_the_run_did(run, tmp_path, capsys):
    """One process's records read twice are not two processes: n and blocks as in the run itself."""
    doubled = tmp_path / "doubled"
    shutil.copytree(run, doubled)
    (doubled / RESULTS).write_bytes((run / RESULTS).read_bytes() * 2)
    lines = len(_records(run))
    with pytest.warns(UserWarning, match=f"dropped {lines} duplicate record\\(s\\)"):
        assert cli(["compare", str(run), str(doubled), "--min-processes", "1", "--json", str(tmp_path / "c.json")]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert rows and all((r["n_head"], r["blocks_head"]) == (r["n_base"], r["blocks_base"]) for r in rows)


def test_resume_completes_a_whole_last_record_missing_its_newline_instead_of_measuring_it_again(run, capsys):
    whole = (run / RESULTS).read_bytes()
    (run / RESULTS).write_bytes(whole.removesuffix(b"\n"))
    assert cli(["run", "--resume", str(run), "--quiet"]) == 0  # every cell is recorded ok: nothing to run
    assert (run / RESULTS).read_bytes() == whole and not (run / "results.jsonl.torn").exists()


@pytest.mark.parametrize("make", ["dir", "fifo"])
def test_resume_of_a_run_whose_records_are_no_regular_file_is_refused(run, capsys, make):
    path = run / RESULTS
    path.unlink()
    path.mkdir() if make == "dir" else os.mkfifo(path)
    err = _one_line_error(capsys, cli(["run", "--resume", str(run), "--quiet"]))
    assert err == f"infermatrix run: error: {path}: the run's records file is not a regular file"
