"""The results contract: run.json plus results.jsonl, one immutable record per cell.

Records are appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced,
so a crash mid-run loses no finished cell; a torn last line (a kill during the write) is
skipped by the loader. When a cell was re-run (``--resume`` after a failure), the latest
record for its ``cell_id`` is the one that counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS = "results.jsonl"
RUN = "run.json"
SCHEMA_PATH = Path(__file__).parent / "schema" / "cell-record.schema.json"


def new_record(cell: dict[str, Any]) -> dict[str, Any]:
    """A record with the cell's identity filled in and no outcome yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "cell_id": cell["cell_id"],
        "model": cell["model"],
        "variant": cell["variant"]["name"],
        "recipe": cell["variant"],
        "device": cell["device"],
        "scenario": dict(cell["scenario"]),
        "status": "failed",
        "error": None,
        "metrics": {},
        "samples": {},
        "method": {},
        "labels": [],
        "timing_s": {},
    }


def failed_record(cell: dict[str, Any], error: str, **timing_s: float) -> dict[str, Any]:
    record = new_record(cell)
    record["error"] = error
    record["timing_s"] = timing_s
    return record


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(run_dir / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(run_dir: Path, latest_only: bool = True) -> list[dict[str, Any]]:
    """Records of a run, in file order; torn or invalid lines are skipped."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "cell_id" in rec:
            records.append(rec)
    if not latest_only:
        return records
    latest = {r["cell_id"]: r for r in records}
    return list(latest.values())


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN).read_text())


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``record`` breaks the contract."""
    import jsonschema

    jsonschema.validate(record, json.loads(SCHEMA_PATH.read_text()))
