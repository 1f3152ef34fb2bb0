"""Results loading and appending, checked against hand-written files."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from bench.cells import Cell
from bench.results import (
    RESULTS,
    RUN,
    SCHEMA_VERSION,
    CorruptRecordWarning,
    DuplicateRecordWarning,
    RecordWriteError,
    append_record,
    failed_record,
    new_record,
    read_records,
    read_run,
    repair_torn_tail,
    validate_record,
    write_json_atomic,
)
from bench.scenarios import GenerateScenario
from optimize.errors import InputError
from optimize.recipe import Recipe

CELL = Cell(model="synthetic:llama-tiny", recipe=Recipe(name="fp32"), device="cpu",
            scenario=GenerateScenario(batch_size=1, prompt_tokens=16, new_tokens=4))




def rec(cid: str, status: str = "ok", **extra) -> dict:
    """The least a reader takes as a record: its identity, status, metrics and samples (cell id ``cid`` x 16)."""
    return {"schema_version": SCHEMA_VERSION, "cell_id": cid * 16, "model": "m", "variant": "v", "device": "cpu",
            "scenario": {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 4},
            "status": status, "metrics": {}, "samples": {}, **extra}


A1, B2 = rec("a", n=1), rec("b", n=2)
TORN = '{"cell_id": "b", "status": "ok", "n"'  # a record cut off mid-write


def _write_lines(run_dir, *lines: str) -> None:
    (run_dir / RESULTS).write_text("".join(line + "\n" for line in lines))


def test_latest_record_of_a_cell_wins_on_load(tmp_path):
    _write_lines(tmp_path,
                 json.dumps(rec("a", "failed", n=1)), json.dumps(rec("b", "ok", n=2)),
                 json.dumps(rec("a", "ok", n=3)), json.dumps(rec("a", "skipped", n=4)))
    latest = read_records(tmp_path)
    assert sorted((r["cell_id"][0], r["n"]) for r in latest) == [("a", 4), ("b", 2)]
    assert [r["n"] for r in read_records(tmp_path, latest_only=False)] == [1, 2, 3, 4]


def test_torn_last_line_is_skipped_and_the_rest_kept(tmp_path):
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + TORN)
    assert read_records(tmp_path) == [A1]


def test_an_unparseable_line_does_not_hide_the_records_after_it(tmp_path):
    _write_lines(tmp_path, json.dumps(A1), TORN, json.dumps(B2))
    assert read_records(tmp_path) == [A1, B2]


def test_record_appended_after_a_torn_write_still_loads(tmp_path):
    """A kill during the write leaves a line without its newline; ``--resume`` then appends after it."""
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + TORN)
    append_record(tmp_path, B2)
    assert read_records(tmp_path) == [A1, B2]


def test_lines_that_are_not_cell_records_are_not_records(tmp_path):
    _write_lines(tmp_path, "[1, 2]", json.dumps({"status": "ok"}), json.dumps({"cell_id": "a"}),
                 json.dumps(rec("a")))
    assert read_records(tmp_path, latest_only=False) == [rec("a")]


def test_missing_results_file_reads_as_no_records(tmp_path):
    assert read_records(tmp_path) == [] and read_records(tmp_path, latest_only=False) == []


def test_append_adds_one_sorted_line_per_record_and_keeps_earlier_ones(tmp_path):
    append_record(tmp_path, {"z": 1, **rec("a"), "b": 2})
    append_record(tmp_path, rec("b", path=tmp_path))  # non-JSON values are stored as text
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert lines[0].startswith('{"b": 2, "cell_id": "aaaaaaaaaaaaaaaa", "device": "cpu", ') and \
        lines[0].endswith(', "z": 1}')
    assert lines == [json.dumps(rec("a", z=1, b=2), sort_keys=True),
                     json.dumps(rec("b", path=str(tmp_path)), sort_keys=True)]
    assert [r["cell_id"] for r in read_records(tmp_path)] == ["a" * 16, "b" * 16]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / RESULTS).stat().st_mode & 0o777 == 0o644 & ~umask  # a data file: never executable


def test_append_refuses_nan_instead_of_writing_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        append_record(tmp_path, {"cell_id": "a", "ttft_ms": math.nan})
    assert not (tmp_path / RESULTS).exists() or (tmp_path / RESULTS).read_text() == ""


def test_new_record_starts_failed_with_the_cells_identity():
    record = new_record(CELL)
    assert record["schema_version"] == SCHEMA_VERSION
    assert (record["cell_id"], record["model"], record["variant"], record["device"]) == (
        CELL.cell_id, "synthetic:llama-tiny", "fp32", "cpu")
    assert record["recipe"] == {"name": "fp32", "steps": []}
    assert record["scenario"] == {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 4}
    assert record["status"] == "failed" and record["error"] is None
    assert record["metrics"] == record["samples"] == record["method"] == record["timing_s"] == {}
    assert record["labels"] == []


def test_failed_record_carries_the_error_and_timings():
    record = failed_record(CELL, "boom", load=1.5, total=2.0)
    assert record["status"] == "failed" and record["error"] == "boom"
    assert record["timing_s"] == {"load": 1.5, "total": 2.0}
    validate_record(record)


def test_validate_record_rejects_a_record_without_status():
    import jsonschema

    record = new_record(CELL)
    del record["status"]
    with pytest.raises(jsonschema.ValidationError, match="'status' is a required property"):
        validate_record(record)


def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"b": 1, "matrix": [1, 2]})
    write_json_atomic(path, {"b": 2, "matrix": {"a": tmp_path}})
    assert path.read_text() == f'{{\n "b": 2,\n "matrix": {{\n  "a": "{tmp_path}"\n }}\n}}\n'  # sorted, indent 1
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    assert read_run(tmp_path) == {"b": 2, "matrix": {"a": str(tmp_path)}}


# --- exact messages, line numbers and the write paths, each against a hand-written file -------

def _warned(recorder) -> str:
    (w,) = [w for w in recorder if issubclass(w.category, CorruptRecordWarning)]
    if "mutmut" not in sys.modules:  # mutation testing puts a frame of its own between caller and callee
        assert w.filename == __file__  # the warning points at the caller, not at the results module
    return str(w.message)


def test_corrupt_lines_are_named_by_number_and_reason(tmp_path):
    lines = [json.dumps(rec("a")), "", "[1, 2]", "not json", json.dumps(rec("b")),
             json.dumps({**rec("c"), "cell_id": 3}), "\xff"]
    (tmp_path / RESULTS).write_bytes("\n".join(lines).encode("utf-8").replace(b"\xc3\xbf", b"\xff") + b"\n")
    with pytest.warns(CorruptRecordWarning) as recorder:
        records = read_records(tmp_path, latest_only=False)
    assert [r["cell_id"] for r in records] == ["a" * 16, "b" * 16]  # the blank line 2 does not stop the reading
    assert _warned(recorder) == (
        f"{tmp_path / RESULTS}: skipped 4 corrupt line(s): 3 ([1, 2] is not of type 'object'), "
        "4 (not valid JSON (JSONDecodeError: Expecting value: line 1 column 1 (char 0))), "
        "6 (cell_id: 3 is not of type 'string'), 7 (not valid JSON (UnicodeDecodeError: 'utf-8' codec can't "
        "decode byte 0xff in position 0: invalid start byte)); the other 2 records loaded")


@pytest.mark.parametrize("count, tail", [(10, ""), (11, " and 1 more"), (13, " and 3 more")])
def test_past_ten_corrupt_lines_the_rest_are_counted(tmp_path, count, tail):
    (tmp_path / RESULTS).write_text("x\n" * count + json.dumps(rec("a")) + "\n")
    with pytest.warns(CorruptRecordWarning) as recorder:
        assert len(read_records(tmp_path)) == 1
    shown = ", ".join(f"{n} (not valid JSON (JSONDecodeError: Expecting value: line 1 column 1 (char 0)))"
                      for n in range(1, 11))
    assert _warned(recorder) == (f"{tmp_path / RESULTS}: skipped {count} corrupt line(s): {shown}{tail}; "
                                 "the other 1 records loaded")


def test_a_torn_tail_moves_to_its_own_file_with_its_line_number(tmp_path):
    (tmp_path / RESULTS).write_bytes(b'{"cell_id": "a", "status": "ok"}\n{"cell_id": "b"}\n{"cell_id": "c", "st')
    with pytest.warns(CorruptRecordWarning) as recorder:
        assert repair_torn_tail(tmp_path) == 3
    assert _warned(recorder) == (f"{tmp_path / RESULTS}:3: torn last line (20 bytes, no newline) moved to "
                                 "results.jsonl.torn")
    assert (tmp_path / RESULTS).read_bytes() == b'{"cell_id": "a", "status": "ok"}\n{"cell_id": "b"}\n'
    assert (tmp_path / "results.jsonl.torn").read_bytes() == b'{"cell_id": "c", "st\n'
    assert repair_torn_tail(tmp_path) is None  # now it ends cleanly


def test_a_file_that_ends_cleanly_or_is_empty_is_left_alone(tmp_path):
    assert repair_torn_tail(tmp_path) is None  # no file
    (tmp_path / RESULTS).write_bytes(b"")
    assert repair_torn_tail(tmp_path) is None
    (tmp_path / RESULTS).write_bytes(b'{"cell_id": "a", "status": "ok"}\n')
    assert repair_torn_tail(tmp_path) is None and not (tmp_path / "results.jsonl.torn").exists()


def test_a_short_write_is_cut_back_and_raised_with_the_cell_and_file(tmp_path, monkeypatch):
    append_record(tmp_path, A1)
    before = (tmp_path / RESULTS).read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))  # a full disk mid-line
    with pytest.raises(RecordWriteError) as exc:
        append_record(tmp_path, B2)
    size = len(json.dumps(B2, sort_keys=True)) + 1  # the line and its newline
    assert str(exc.value) == (f"could not write the record of cell {'b' * 16} to {tmp_path / RESULTS}: short write: "
                              f"7 of {size} bytes")
    assert (tmp_path / RESULTS).read_bytes() == before  # the fragment is gone, the earlier record kept


def test_write_json_atomic_writes_sorted_keys_and_keeps_the_original_error(tmp_path, monkeypatch):
    from pathlib import Path

    write_json_atomic(tmp_path / "x.json", {"b": 1, "a": {"d": 2, "c": 3}})
    assert (tmp_path / "x.json").read_text() == '{\n "a": {\n  "c": 3,\n  "d": 2\n },\n "b": 1\n}\n'

    def full_disk(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)  # fails before the temporary file exists
    with pytest.raises(OSError, match="No space left on device"):
        write_json_atomic(tmp_path / "y.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("content, message", [
    (None, "{d}: no run.json there, not a run directory"),
    ("{", "{d}/run.json is unreadable or corrupt (JSONDecodeError: Expecting property name enclosed in double "
          "quotes: line 1 column 2 (char 1)); it cannot be resumed or reported"),
    ("[]", "{d}/run.json is not a run description (no 'matrix' table); it cannot be resumed or reported"),
    ('{"matrix": 3}', "{d}/run.json is not a run description (no 'matrix' table); it cannot be resumed or reported"),
])
def test_read_run_names_the_file_and_why(tmp_path, content, message):
    if content is not None:
        (tmp_path / RUN).write_text(content)
    with pytest.raises(InputError) as exc:
        read_run(tmp_path)
    assert str(exc.value) == message.format(d=tmp_path)
    (tmp_path / RUN).write_text('{"matrix": {}}')
    assert read_run(tmp_path) == {"matrix": {}}


# --- what the loader takes as JSON, as a record and as a run description ------------------------


@pytest.mark.parametrize("text, reason", [
    ("[NaN]", "NaN is not a JSON number"), ("[-Infinity]", "-Infinity is not a JSON number"),
    ("[Infinity]", "Infinity is not a JSON number"), ("[1e400]", "1e400 is out of range"),
    ("[-1e400]", "-1e400 is out of range"), (f"[{2**63}]", "an integer of 19 digits is out of range"),
    (f"[{-2**63}]", "an integer of 20 digits is out of range"),
    ('["\\udc80"]', "a string holds a lone surrogate"), ('["\\uD800x"]', "a string holds a lone surrogate")])
def test_strict_json_refuses_what_json_has_no_number_or_text_for(text, reason):
    from bench.results import loads_strict

    for raw in (text, text.encode()):
        with pytest.raises(ValueError) as exc:
            loads_strict(raw)
        assert str(exc.value) == reason


def test_strict_json_takes_the_largest_numbers_and_escaped_text():
    from bench.results import loads_strict

    assert loads_strict(f"[{2**63 - 1}, {-(2**63) + 1}, 1.7e308, -0.0]") == [2**63 - 1, -(2**63) + 1, 1.7e308, -0.0]
    assert loads_strict(b'["\\ud83d\\ude00", "\\\\ud800"]') == ["\U0001f600", "\\ud800"]  # a pair; a backslash


def test_schema_problems_name_where_the_record_breaks_and_cut_long_messages():
    from bench.results import schema_problem

    assert schema_problem(A1) is None
    assert schema_problem({**A1, "metrics": {"ttft_ms": {"p50": "fast"}}}) == \
        "metrics/ttft_ms: 'n' is a required property"
    assert schema_problem({**A1, "samples": {"itl_ms": [[1.0, -1.0]]}}) == \
        "samples/itl_ms/0/1: -1.0 is less than or equal to the minimum of 0"
    # a gated sample is one figure per repetition: the gate and history read it as numbers
    assert schema_problem({**A1, "samples": {"tpot_ms": [[1.0, 2.0]]}}) == \
        "samples/tpot_ms/0: [1.0, 2.0] is not of type 'number'"
    no_id = {k: v for k, v in A1.items() if k != "cell_id"}
    assert schema_problem(no_id) == "'cell_id' is a required property"  # the top: no place to name
    long = schema_problem({**A1, "variant": "x" * 400})
    assert long is None  # any string is a name
    long = schema_problem({**A1, "device": "y" * 400})
    assert long.startswith("device: 'yyy") and len(long) == len("device: ") + 160


def test_a_record_need_not_hold_every_figure_but_the_full_contract_does():
    from bench.results import schema_problem

    ok_without_figures = rec("a", recipe={"name": "v", "steps": []}, error=None, method={}, labels=[], timing_s={})
    assert schema_problem(ok_without_figures) is None
    assert schema_problem(ok_without_figures, for_reading=False) == "metrics: 'ttft_ms' is a required property"


def test_a_record_that_keeps_the_contract_is_passed_by_the_compiled_check_alone(monkeypatch):
    """jsonschema (about 20 times slower) is asked only to explain a record the compiled check rejects."""
    from bench import results

    monkeypatch.setattr(results, "_validator", lambda *_: pytest.fail("jsonschema asked about a good record"))
    ok_without_figures = rec("a", recipe={"name": "v", "steps": []}, error=None, method={}, labels=[], timing_s={})
    assert results.schema_problem(A1) is None and results.schema_problem(ok_without_figures) is None


def test_run_files_that_are_no_regular_file_or_cannot_be_looked_at(tmp_path, monkeypatch):
    (tmp_path / RESULTS).mkdir()
    with pytest.raises(InputError) as exc:
        read_records(tmp_path)
    assert str(exc.value) == f"{tmp_path / RESULTS}: the run's records file is not a regular file"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as exc:
        read_run(blocker)  # run.json under a file: stat says "Not a directory"
    assert str(exc.value) == f"{blocker / RUN}: the run description cannot be read (Not a directory)"
    with pytest.raises(InputError) as exc:
        read_run(tmp_path)
    assert str(exc.value) == f"{tmp_path}: no {RUN} there, not a run directory"
    (tmp_path / RESULTS).rmdir()
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n")

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "read_bytes", refused)
    with pytest.raises(InputError) as exc:
        read_records(tmp_path)
    assert str(exc.value) == f"{tmp_path / RESULTS}: the run's records file cannot be read (Permission denied)"


def test_a_line_that_is_not_json_names_the_parser_s_reason_cut_short(tmp_path):
    (tmp_path / RESULTS).write_text('{"cell_id": ' + "1" * 5000 + "}\n" + json.dumps(A1) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert read_records(tmp_path) == [A1]
    reason = str(caught[0].message).split("line(s): 1 (", 1)[1].split("); the other")[0]
    assert reason.startswith("not valid JSON (ValueError: Exceeds the limit (4300 digits) for integer string")
    assert len(reason) == len("not valid JSON (ValueError: ") + 80 + 1


@pytest.mark.parametrize("change, where", [
    (lambda j: j.update(environment=None), "environment: None is not of type 'object'"),
    (lambda j: j.update(schema_version=2), "schema_version: 1 was expected"),
    (lambda j: j.update(roofline={"cpu": {"memory": {"bandwidth_gbps": 0}}}),
     "roofline/cpu/memory/bandwidth_gbps: 0 is less than or equal to the minimum of 0")])
def test_a_run_description_of_the_wrong_shape_names_where(tmp_path, change, where):
    run = {"schema_version": 1, "matrix": {"name": "m"}, "environment": {}, "roofline": None}
    write_json_atomic(tmp_path / RUN, run)
    assert read_run(tmp_path) == run
    change(run)
    write_json_atomic(tmp_path / RUN, run)
    with pytest.raises(InputError) as exc:
        read_run(tmp_path)
    assert str(exc.value) == f"{tmp_path / RUN} is not a run description ({where}); it cannot be resumed or reported"
    (tmp_path / RUN).write_text('{"matrix": {}, "x": NaN}')
    with pytest.raises(InputError) as exc:
        read_run(tmp_path)
    assert str(exc.value) == (f"{tmp_path / RUN} is unreadable or corrupt (ValueError: NaN is not a JSON number); "
                              "it cannot be resumed or reported")


@pytest.mark.parametrize("key, stat, domain", [
    ("ttft_ms", None, (0, True, 1e15)),  # a summary's point value is its p50: above 0, at most 1e15
    ("ttft_ms", "p99", (0, True, 1e15)),
    ("ttft_ms", "max", (0, True, 1e15)),
    ("ttft_ms", "p75", (None, False, None)),  # a statistic summaries do not hold: no range
    ("decode_tokens_per_s", None, (0, True, None)),
    ("kld_mean", None, (0, False, None)),
    ("top1_agreement", None, (0, False, 1)),
    ("ln_ppl_ratio", None, (None, False, None)),  # a log ratio: any sign
    ("rss_increase_bytes", None, (None, False, None)),
    ("not_a_metric", None, (None, False, None)),
])
def test_the_range_a_metric_may_take_comes_from_the_record_schema(key, stat, domain):
    from bench.results import metric_domain

    assert metric_domain(key, stat) == domain


# --- a whole last record short of its newline, repeated records, strict reading -------------------------------

def test_a_whole_last_record_without_its_newline_gets_the_newline_and_stays(tmp_path, recwarn):
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + json.dumps(B2))  # the write's newline never landed
    assert repair_torn_tail(tmp_path) is None
    assert (tmp_path / RESULTS).read_text() == json.dumps(A1) + "\n" + json.dumps(B2) + "\n"
    assert not (tmp_path / "results.jsonl.torn").exists() and not recwarn.list  # nothing moved, nothing to warn of
    append_record(tmp_path, rec("c"))
    assert [r["cell_id"][0] for r in read_records(tmp_path)] == ["a", "b", "c"]


@pytest.mark.parametrize("tail", [json.dumps({**B2, "schema_version": 2}), json.dumps(B2).replace("2}", "NaN}")])
def test_a_last_line_that_parses_but_is_no_record_is_still_torn(tmp_path, tail):
    """The same check the reader makes: a line the reader would skip is not completed into the file."""
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + tail)
    with pytest.warns(CorruptRecordWarning, match=r"results.jsonl:2: torn last line"):
        assert repair_torn_tail(tmp_path) == 2
    assert (tmp_path / RESULTS).read_text() == json.dumps(A1) + "\n"
    assert (tmp_path / "results.jsonl.torn").read_text() == tail + "\n"


@pytest.mark.parametrize("make", ["dir", "fifo"])
def test_repairing_a_results_file_that_is_no_regular_file_is_bad_input(tmp_path, make):
    path = tmp_path / RESULTS
    path.mkdir() if make == "dir" else os.mkfifo(path)
    with pytest.raises(InputError) as exc:
        repair_torn_tail(tmp_path)
    assert str(exc.value) == f"{path}: the run's records file is not a regular file"


STAMPED = {"started_at": "2026-12-02T10:00:00Z"}  # a cell process's record: one measurement, stamped when it began


def test_a_record_repeated_whole_is_read_once_with_a_warning_naming_its_lines(tmp_path):
    # two rounds of one cell: different records, both kept
    a_round, b_round, b2 = rec("a", n=1, **STAMPED), rec("a", n=2, **STAMPED), {**B2, **STAMPED}
    _write_lines(tmp_path, *(json.dumps(r) for r in (a_round, b_round, b2, a_round, b2)))
    with pytest.warns(UserWarning) as recorder:
        records = read_records(tmp_path, latest_only=False)
    assert records == [a_round, b_round, b2]
    (w,) = recorder.list
    assert w.category is DuplicateRecordWarning
    if "mutmut" not in sys.modules:  # mutation testing puts a frame of its own between caller and callee
        assert w.filename == __file__
    assert str(w.message) == (f"{tmp_path / RESULTS}: dropped 2 duplicate record(s), each the same as an earlier "
                              "line: lines 4 (repeats 1), 5 (repeats 3)")


def test_a_copy_of_a_record_with_its_keys_in_another_order_is_the_same_record(tmp_path):
    a1 = {**A1, **STAMPED}
    _write_lines(tmp_path, json.dumps(a1), json.dumps(dict(reversed(a1.items()))))
    with pytest.warns(DuplicateRecordWarning, match="dropped 1 duplicate"):
        assert read_records(tmp_path, latest_only=False) == [a1]


def test_an_unstamped_outcome_written_again_is_another_outcome_not_a_copy(tmp_path, recwarn):
    """A build's skip is given to its cells by the parent, unstamped, once per run and again on each resume."""
    skipped = rec("a", status="skipped", error="build: fp16 needs CUDA")
    failed = rec("a", status="failed", error="build: boom")
    _write_lines(tmp_path, *(json.dumps(r) for r in (skipped, failed, skipped)))
    assert read_records(tmp_path, latest_only=False) == [skipped, failed, skipped]
    assert read_records(tmp_path) == [skipped]  # the newest outcome stands
    assert not [w for w in recwarn if w.category is DuplicateRecordWarning]


def test_strict_reading_refuses_a_complete_line_that_is_no_record_but_skips_a_torn_tail(tmp_path):
    _write_lines(tmp_path, json.dumps(A1), json.dumps({**B2, "schema_version": 2}))
    with pytest.raises(InputError) as exc:
        read_records(tmp_path, strict=True)
    assert str(exc.value) == f"{tmp_path / RESULTS}:2: not a record (schema_version: 1 was expected)"
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + TORN)  # a write cut short: left out, as ever
    with pytest.warns(CorruptRecordWarning, match="skipped 1 corrupt line"):
        assert read_records(tmp_path, strict=True) == [A1]
