"""The results contract: run.json plus results.jsonl, one immutable record per cell.

Records are appended whole or not at all: one ``O_APPEND`` write of a line ending in a
newline, its byte count checked, fsynced; a short write (a full disk) is cut back off and
raised. A torn last line left by a crash is moved to ``results.jsonl.torn`` (with a
warning naming the line) before the next append, so it never glues onto a new record.
A last line that is a whole record short of its newline gets the newline and stays.
The loader skips corrupt lines with a warning giving their numbers and why (not JSON, NaN
or an out-of-range number, a field missing or of the wrong type by the record schema) and
keeps the good ones; a line repeating an earlier record whole is dropped with a warning
(one measurement read twice is not two). When a cell was re-run (``--resume`` after a
failure), the latest record for its ``cell_id`` is the one that counts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.atomic import write_atomic
from optimize.errors import InputError, clip

if TYPE_CHECKING:
    from bench.cells import Cell

SCHEMA_VERSION = 1
RESULTS = "results.jsonl"
RUN = "run.json"
TORN = "results.jsonl.torn"


class CorruptRecordWarning(UserWarning):
    """A line of results.jsonl that is not a whole record; it is skipped, the others load."""


class DuplicateRecordWarning(UserWarning):
    """A line of results.jsonl that repeats an earlier record whole; it is counted once."""


class RunWriteError(OSError):
    """A file of the run directory could not be written (a full disk, a folder made read-only or immutable
    mid-run): the run stops with this one line, exit 1, and what was written before it is intact.
    """


class RecordWriteError(RunWriteError):
    """A record could not be written whole (a full disk, an I/O error); nothing of it was kept."""


SCHEMA_PATH = Path(__file__).parent / "schema" / "cell-record.schema.json"
RUN_SCHEMA_PATH = Path(__file__).parent / "schema" / "run.schema.json"


def recorded_revision(run: dict[str, Any]) -> dict[str, Any]:
    """The revision a run measured, as its run.json records it: an ``ab`` side's commit (a clean worktree),
    else the commit of the repository the run belongs to (``environment.user_repository``), else the
    harness's own checkout's; ``{"commit": None, "dirty": None}`` when none is recorded.
    """
    env = run.get("environment") or {}
    ab = run.get("ab")
    for where in (ab, env.get("user_repository"), env.get("git")):
        if isinstance(where, dict) and isinstance(where.get("commit"), str) and where["commit"]:
            dirty = False if where is ab else where.get("dirty")
            return {"commit": where["commit"], "dirty": dirty if isinstance(dirty, bool) else None}
    return {"commit": None, "dirty": None}


def run_identity(run: dict[str, Any]) -> str | None:
    """What makes two run directories one run (a copy, an artifact downloaded to another path): its start,
    host, matrix, shard, ``ab`` side and the revision it measured (the two sides of an ``ab`` job start
    together). None for a run.json without a start time (nothing to tell runs apart by).
    """
    import hashlib

    if not run.get("started"):
        return None
    env = run.get("environment") or {}
    key = [run["started"], env.get("hostname"), run.get("matrix_hash"), run.get("shard"), run.get("ab"),
           recorded_revision(run)["commit"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def utc_now() -> str:
    """The current UTC time as run.json and records write it (ISO 8601, seconds, ``Z``)."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        "host": platform.node(),  # where it was measured: a resumed, merged or Ray run may span machines
    }


def failed_record(cell: Cell, error: str, **timing_s: float) -> dict[str, Any]:
    record = new_record(cell)
    record["error"] = error
    record["timing_s"] = timing_s
    return record


def repair_torn_tail(run_dir: Path) -> int | None:
    """Settle a last line without its newline before the next append.

    A whole record that lacks only its newline (it reads as the loader reads every line) gets the newline and
    stays; anything else (a write cut short by a crash) is moved to ``results.jsonl.torn`` with a warning.

    Returns:
        The torn line's number, or None when the file ends cleanly or its last record was completed.

    Raises:
        InputError: results.jsonl is there but no regular file (a folder, a pipe) or cannot be read.

    """
    path = Path(run_dir) / RESULTS
    if not _regular_file(path, "the run's records file"):
        return None
    try:
        with path.open("r+b") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return None
            start = data.rfind(b"\n") + 1
            line_no = data.count(b"\n") + 1  # every newline is before the torn line
            if _line_problem(data[start:])[1] is None:  # whole, only its newline missing: complete it
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                return None
            with (Path(run_dir) / TORN).open("ab") as torn:
                torn.write(data[start:] + b"\n")
                torn.flush()
                os.fsync(torn.fileno())
            fh.truncate(start)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise InputError(f"{path}: the run's records file cannot be repaired ({exc.strerror or exc})") from None
    warnings.warn(f"{path}:{line_no}: torn last line ({len(data) - start} bytes, no newline) moved to {TORN}",
                  CorruptRecordWarning, stacklevel=2)
    return line_no


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, whole or not at all.

    Raises:
        RecordWriteError: the line could not be written whole; the file is as it was.

    """
    line = (json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    try:
        repair_torn_tail(run_dir)
    except InputError as exc:  # the file cannot take a record: this write fails, the records before it stand
        raise RecordWriteError(f"could not write the record of cell {record.get('cell_id')}: {exc}") from None
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


# What a reader needs of a record; any other field of the contract is read with a default when missing.
READ_REQUIRED = ["schema_version", "cell_id", "model", "variant", "device", "scenario", "status", "metrics", "samples"]


@functools.cache
def _validator(schema_path: Path = SCHEMA_PATH, for_reading: bool = False):
    """A validator of ``schema_path``. For reading records: the fields a reader needs must be there, and every
    field there must have the contract's type and range, but figures may be missing (a cell that measured
    less, a metric another version does not take).
    """
    import jsonschema

    schema = _schema(schema_path, for_reading)
    return jsonschema.validators.validator_for(schema)(schema)


def _schema(schema_path: Path, for_reading: bool) -> dict[str, Any]:
    schema = json.loads(schema_path.read_text())
    if for_reading:
        schema = {k: v for k, v in schema.items() if k != "allOf"} | {"required": READ_REQUIRED}
    return schema


@functools.cache
def _compiled_check(schema_path: Path = SCHEMA_PATH, for_reading: bool = True) -> Callable[[Any], Any]:
    """``_validator``'s schema compiled to Python by fastjsonschema: about 20 times faster on a valid record, so
    reading a run of thousands of records stays quick; it raises on the first problem, which jsonschema then
    explains. Our schemas use only keywords draft-07 and 2020-12 read alike (no ``$ref`` with siblings,
    ``items`` a single schema), so it is compiled as draft-07, the newest fastjsonschema knows;
    ``tests/bench/test_schema_agreement.py`` holds the two to the same verdicts.
    """
    import fastjsonschema

    schema = {k: v for k, v in _schema(schema_path, for_reading).items() if k != "$id"}
    return fastjsonschema.compile(schema | {"$schema": "http://json-schema.org/draft-07/schema#"})


def metric_domain(key: str, stat: str | None = None) -> tuple[float | None, bool, float | None]:
    """The range the record contract allows a metric's figure: ``(low, low_excluded, high)``, None where
    unbounded. ``stat`` names a statistic of a summary metric (its point value is the p50).
    """
    schema = _validator().schema
    prop = schema["properties"]["metrics"]["properties"].get(key, {})
    if "$ref" in prop:  # a summary: each statistic has its own range
        summary = schema["$defs"][prop["$ref"].removeprefix("#/$defs/")]
        prop = summary["properties"].get(stat or "p50", {})
    if "exclusiveMinimum" in prop:
        return prop["exclusiveMinimum"], True, prop.get("maximum")
    return prop.get("minimum"), False, prop.get("maximum")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if abs(value) >= 2**63:
        raise ValueError(f"an integer of {len(text)} digits is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(text: str | bytes) -> Any:
    """JSON as the results contract allows it: no NaN or Infinity, no number beyond a double or a 64-bit integer,
    no lone surrogate in a string (each ``ValueError``).
    """
    value = json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant)
    if ("\\ud" if isinstance(text, str) else b"\\ud") in text.lower():  # only an escape can carry a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate") from None
    return value


def schema_problem(value: Any, schema_path: Path = SCHEMA_PATH, for_reading: bool = True) -> str | None:
    """The first way ``value`` breaks the schema, as ``where: what`` (``what`` alone at the top), or None."""
    import fastjsonschema
    import jsonschema

    try:
        _compiled_check(schema_path, for_reading)(value)
        return None
    except fastjsonschema.JsonSchemaValueException:
        pass  # jsonschema names the best-matching problem
    error = jsonschema.exceptions.best_match(_validator(schema_path, for_reading).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where + ': ' if where else ''}{clip(error.message, 160)}"


def _regular_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; an ``InputError`` when it is there but no regular file (a folder, a device, a pipe)
    or cannot be looked at.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise InputError(f"{path}: {what} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: {what} is not a regular file")
    return True


def _line_problem(raw: bytes) -> tuple[Any, str | None]:
    """(the record, None) when a line of results.jsonl reads as a record, else (None, why not)."""
    try:
        rec = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
    why = schema_problem(rec)
    return (rec, None) if why is None else (None, why)


def _listed(items: list[str]) -> str:
    return ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")


def read_records(run_dir: Path, latest_only: bool = True, strict: bool = False) -> list[dict[str, Any]]:
    """Records of a run, in file order.

    Corrupt lines (torn, not JSON, not a record) are skipped with one ``CorruptRecordWarning``
    naming their line numbers; every good line still loads. A record that repeats an earlier one
    whole (a results.jsonl appended to itself, or concatenated with a copy) is one measurement, not
    two: it is dropped with one ``DuplicateRecordWarning`` naming its lines.

    Args:
        run_dir: the run directory.
        latest_only: keep only the latest record of each cell.
        strict: refuse (``InputError`` naming the file, line and why) a complete line that is not a record;
            only a last line without its newline (a write cut short) is still skipped with a warning.

    """
    path = Path(run_dir) / RESULTS
    if not _regular_file(path, "the run's records file"):
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: the run's records file cannot be read ({exc.strerror})") from None
    records, bad, repeated, seen = [], [], [], {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rec, why = _line_problem(raw)
        if why is not None:
            torn = number == len(lines)  # the last line, without its newline
            if strict and not torn:
                raise InputError(f"{path}:{number}: not a record ({why})")
            bad.append(f"{number} ({why})")
            continue
        # A record a cell's process stamped with its start time is one measurement: the same again is a copy.
        # Records made in the parent (a build's skip, given to each cell on every resume) repeat legitimately.
        key = json.dumps(rec, sort_keys=True) if rec.get("started_at") else None
        if key is not None and key in seen:
            repeated.append(f"{number} (repeats {seen[key]})")
            continue
        if key is not None:
            seen[key] = number
        records.append(rec)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} corrupt line(s): {_listed(bad)}; the other {len(records)} "
                      "records loaded", CorruptRecordWarning, stacklevel=2)
    if repeated:
        warnings.warn(f"{path}: dropped {len(repeated)} duplicate record(s), each the same as an earlier line: "
                      f"lines {_listed(repeated)}", DuplicateRecordWarning, stacklevel=2)
    if not latest_only:
        return records
    latest = {r["cell_id"]: r for r in records}
    return list(latest.values())


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def require_run_dir(run_dir: Path, flag: str | None = None) -> None:
    """``InputError`` unless ``run_dir`` holds a run.json: "DIR is not a run directory (no run.json)" (with
    ``flag``: "--resume DIR: no run.json there, ..."), or, while a run that has taken the directory's lock
    has not written its run.json yet, that it is being started and by which process.
    """
    from bench.runlock import holder_pid

    if os.path.lexists(Path(run_dir) / RUN):  # one that is no regular file is read_run's to refuse, by name
        return
    pid = holder_pid(run_dir)
    if pid is not None:
        raise InputError(f"{f'{flag} ' if flag else ''}{run_dir}: a run is starting there (infermatrix, PID {pid}) "
                         f"and has not written its {RUN} yet; wait for it")
    raise InputError(f"{flag} {run_dir}: no {RUN} there, not a run directory" if flag
                     else f"{run_dir} is not a run directory (no {RUN})")


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of ``run_dir``; a missing or corrupt one is an ``InputError`` naming the file."""
    path = Path(run_dir) / RUN
    if not _regular_file(path, "the run description"):
        raise InputError(f"{run_dir}: no {RUN} there, not a run directory")
    try:
        run = loads_strict(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); it cannot be "
                         "resumed or reported") from None
    if not isinstance(run, dict) or not isinstance(run.get("matrix"), dict):
        raise InputError(f"{path} is not a run description (no 'matrix' table); it cannot be resumed or reported")
    problem = schema_problem(run, RUN_SCHEMA_PATH, for_reading=False)
    if problem:
        raise InputError(f"{path} is not a run description ({problem}); it cannot be resumed or reported")
    return run


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``record`` breaks the contract."""
    _validator().validate(record)
