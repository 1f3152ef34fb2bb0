"""The compiled schema check (fastjsonschema, draft-07) and jsonschema (draft 2020-12) give one verdict.

Records and run descriptions are read through the compiled check, and jsonschema explains what it
rejects; a record the compiled check let through that jsonschema would refuse would reach the
reports unchecked. Every place of a real record and run description is broken in turn, each way
a hostile or damaged file could break it, and both validators must agree on every result.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench.results import RUN_SCHEMA_PATH, SCHEMA_PATH, _compiled_check, _validator, read_records

EXAMPLE = Path(__file__).resolve().parents[2] / "reports" / "example"
# Every JSON type, the edges of the ranges the schemas draw (0, negatives, beyond 1e15, a fraction
# above 1), and a string where a name or a figure is expected.
REPLACEMENTS = [None, True, 0, -1, 0.0, 0.5, 1.5, 2**40, 1e16, "", "x", [], [1.0], {}, {"p50": 1.0}]
DELETE = object()


def _places(value, path=()):
    """Every path into ``value``: each key of a mapping, the first item of a list."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _places(v, (*path, k))
    elif isinstance(value, list) and value:
        yield from _places(value[0], (*path, 0))


def _broken(value, path, replacement):
    out = copy.deepcopy(value)
    target = out
    for step in path[:-1]:
        target = target[step]
    if replacement is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = replacement
    return out


def _disagreements(value, schema_path: Path, for_reading: bool) -> list[str]:
    full, compiled = _validator(schema_path, for_reading), _compiled_check(schema_path, for_reading)
    out = []
    for path in list(_places(value))[1:]:
        for replacement in [*REPLACEMENTS, DELETE]:
            if replacement is DELETE and isinstance(path[-1], int):
                continue
            broken = _broken(value, path, replacement)
            try:
                compiled(broken)
                fast = True
            except Exception:  # fastjsonschema.JsonSchemaValueException
                fast = False
            if fast != full.is_valid(broken):
                what = "deleted" if replacement is DELETE else json.dumps(replacement)
                out.append(f"{'/'.join(map(str, path))} = {what}: compiled {fast}, jsonschema {not fast}")
    return out


def _record(status: str) -> dict:
    records = read_records(EXAMPLE)
    if status == "ok":
        return max(records, key=lambda r: len(list(_places(r))))  # the one with most places
    skipped = copy.deepcopy(records[0])
    skipped.update(status="skipped", error="bitsandbytes is not installed")
    skipped["metrics"], skipped["samples"] = {}, {}
    return skipped


@pytest.mark.slow
@pytest.mark.parametrize("status", ["ok", "skipped"])
@pytest.mark.parametrize("for_reading", [True, False], ids=["read", "write"])
def test_the_compiled_record_check_agrees_with_jsonschema_on_every_broken_record(status, for_reading):
    record = _record(status)
    assert _validator(SCHEMA_PATH, for_reading).is_valid(record)
    assert _disagreements(record, SCHEMA_PATH, for_reading) == []


def test_the_compiled_run_check_agrees_with_jsonschema_on_every_broken_run_description():
    run = json.loads((EXAMPLE / "run.json").read_text())
    assert _validator(RUN_SCHEMA_PATH, False).is_valid(run)
    assert _disagreements(run, RUN_SCHEMA_PATH, False) == []
