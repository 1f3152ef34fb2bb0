"""The results contract: run.json plus results.jsonl, one immutable record per cell.

Records are appended whole or not at all: one ``O_APPEND`` write of a line ending in a
newline, its byte count checked, fsynced; a short write (a full disk) is cut back off and
raised. A torn last line left by a crash is moved to ``results.jsonl.torn`` (with a
warning naming the line) before the next append, so it never glues onto a new record.
The loader skips corrupt lines with a warning giving their numbers and keeps the good
ones. When a cell was re-run (``--resume`` after a failure), the latest record for its
``cell_id`` is the one that counts.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.atomic import write_atomic
from optimize.errors import InputError

if TYPE_CHECKING:
    from bench.cells import Cell

SCHEMA_VERSION = 1
RESULTS = "results.jsonl"
RUN = "run.json"
TORN = "results.jsonl.torn"


class CorruptRecordWarning(UserWarning):
    """A line of results.jsonl that is not a whole record; it is skipped, the others load."""


class RecordWriteError(OSError):
    """A record could not be written whole (a full disk, an I/O error); nothing of it was kept."""
SCHEMA_PATH = Path(__file__).parent / "schema" / "cell-record.schema.json"


def new_record(cell: Cell) -> dict[str, Any]:
    """A record with the cell's identity filled in and no outcome yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "cell_id": cell.cell_id,
        "model": cell.model,
        "variant": cell.recipe.name,
        "recipe": cell.recipe.to_dict(),
        "device": cell.device,
        "scenario": cell.scenario.to_dict(),
        "status": "failed",
        "error": None,
        "metrics": {},
        "samples": {},
        "method": {},
        "labels": [],
        "timing_s": {},
    }


def failed_record(cell: Cell, error: str, **timing_s: float) -> dict[str, Any]:
    record = new_record(cell)
    record["error"] = error
    record["timing_s"] = timing_s
    return record


def repair_torn_tail(run_dir: Path) -> int | None:
    """Move a last line without its newline (a write cut short by a crash) to ``results.jsonl.torn``.

    Returns:
        The torn line's number, or None when the file ends cleanly.

    """
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return None
    with path.open("r+b") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return None
        start = data.rfind(b"\n") + 1
        line_no = data.count(b"\n") + 1  # every newline is before the torn line
        with (Path(run_dir) / TORN).open("ab") as torn:
            torn.write(data[start:] + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        fh.truncate(start)
        fh.flush()
        os.fsync(fh.fileno())
    warnings.warn(f"{path}:{line_no}: torn last line ({len(data) - start} bytes, no newline) moved to {TORN}",
                  CorruptRecordWarning, stacklevel=2)
    return line_no


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, whole or not at all.

    Raises:
        RecordWriteError: the line could not be written whole; the file is as it was.

    """
    line = (json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    repair_torn_tail(run_dir)
    fd = os.open(Path(run_dir) / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write: {written} of {len(line)} bytes")
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, before)  # drop the fragment: a partial line would corrupt the next record
            raise RecordWriteError(f"could not write the record of cell {record.get('cell_id')} to "
                                   f"{Path(run_dir) / RESULTS}: {exc}") from None
    finally:
        os.close(fd)


def _check_record(rec: Any) -> str | None:
    """Why ``rec`` is not a usable record, or None."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    for key in ("cell_id", "status"):
        if not isinstance(rec.get(key), str):
            return f"no string {key!r}"
    return None


def read_records(run_dir: Path, latest_only: bool = True) -> list[dict[str, Any]]:
    """Records of a run, in file order.

    Corrupt lines (torn, not JSON, not a record) are skipped with one ``CorruptRecordWarning``
    naming their line numbers; every good line still loads.
    """
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return []
    records, bad = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            why = _check_record(rec)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            why = f"not valid JSON ({type(exc).__name__})"
        if why is None:
            records.append(rec)
        else:
            bad.append(f"{number} ({why})")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} corrupt line(s): {shown}; the other {len(records)} records "
                      "loaded", CorruptRecordWarning, stacklevel=2)
    if not latest_only:
        return records
    latest = {r["cell_id"]: r for r in records}
    return list(latest.values())


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of ``run_dir``; a missing or corrupt one is an ``InputError`` naming the file."""
    path = Path(run_dir) / RUN
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{run_dir}: no {RUN} there, not a run directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); it cannot be "
                         "resumed or reported") from None
    if not isinstance(run, dict) or not isinstance(run.get("matrix"), dict):
        raise InputError(f"{path} is not a run description (no 'matrix' table); it cannot be resumed or reported")
    return run


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``record`` breaks the contract."""
    import jsonschema

    jsonschema.validate(record, json.loads(SCHEMA_PATH.read_text()))
