"""Results loading and appending, checked against hand-written files."""

from __future__ import annotations

import json
import math
import os

import pytest

from bench.results import (
    RESULTS,
    SCHEMA_VERSION,
    append_record,
    failed_record,
    new_record,
    read_records,
    read_run,
    validate_record,
    write_json_atomic,
)

CELL = {"cell_id": "0123456789abcdef", "model": "synthetic:llama-tiny", "variant": {"name": "fp32", "steps": []},
        "device": "cpu",
        "scenario": {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 4}}


A1, B2 = {"cell_id": "a", "status": "ok", "n": 1}, {"cell_id": "b", "status": "ok", "n": 2}
TORN = '{"cell_id": "b", "status": "ok", "n"'  # a record cut off mid-write


def _write_lines(run_dir, *lines: str) -> None:
    (run_dir / RESULTS).write_text("".join(line + "\n" for line in lines))


def test_latest_record_of_a_cell_wins_on_load(tmp_path):
    _write_lines(tmp_path,
                 json.dumps({"cell_id": "a", "status": "failed", "n": 1}),
                 json.dumps({"cell_id": "b", "status": "ok", "n": 2}),
                 json.dumps({"cell_id": "a", "status": "ok", "n": 3}),
                 json.dumps({"cell_id": "a", "status": "skipped", "n": 4}))
    latest = read_records(tmp_path)
    assert sorted((r["cell_id"], r["n"]) for r in latest) == [("a", 4), ("b", 2)]
    assert [r["n"] for r in read_records(tmp_path, latest_only=False)] == [1, 2, 3, 4]


def test_torn_last_line_is_skipped_and_the_rest_kept(tmp_path):
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + TORN)
    assert read_records(tmp_path) == [{"cell_id": "a", "status": "ok", "n": 1}]


def test_an_unparseable_line_does_not_hide_the_records_after_it(tmp_path):
    _write_lines(tmp_path, json.dumps(A1), TORN,
                 json.dumps({"cell_id": "b", "status": "ok", "n": 2}))
    assert read_records(tmp_path) == [A1, B2]


def test_record_appended_after_a_torn_write_still_loads(tmp_path):
    """A kill during the write leaves a line without its newline; ``--resume`` then appends after it."""
    (tmp_path / RESULTS).write_text(json.dumps(A1) + "\n" + TORN)
    append_record(tmp_path, {"cell_id": "b", "status": "ok", "n": 2})
    assert read_records(tmp_path) == [A1, B2]


def test_lines_that_are_not_cell_records_are_not_records(tmp_path):
    _write_lines(tmp_path, "[1, 2]", json.dumps({"status": "ok"}), json.dumps({"cell_id": "a"}),
                 json.dumps({"cell_id": "a", "status": "ok"}))
    assert read_records(tmp_path, latest_only=False) == [{"cell_id": "a", "status": "ok"}]


def test_missing_results_file_reads_as_no_records(tmp_path):
    assert read_records(tmp_path) == [] and read_records(tmp_path, latest_only=False) == []


def test_append_adds_one_sorted_line_per_record_and_keeps_earlier_ones(tmp_path):
    append_record(tmp_path, {"cell_id": "a", "status": "ok", "z": 1, "b": 2})
    append_record(tmp_path, {"cell_id": "b", "status": "ok", "path": tmp_path})  # non-JSON values are stored as text
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert lines == ['{"b": 2, "cell_id": "a", "status": "ok", "z": 1}',
                     json.dumps({"cell_id": "b", "path": str(tmp_path), "status": "ok"})]
    assert [r["cell_id"] for r in read_records(tmp_path)] == ["a", "b"]
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
        "0123456789abcdef", "synthetic:llama-tiny", "fp32", "cpu")
    assert record["recipe"] == CELL["variant"] and record["scenario"] == CELL["scenario"]
    assert record["scenario"] is not CELL["scenario"]  # a copy: editing the record leaves the cell alone
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
