"""Fuzzing the three parsers of user files: any input ends in a result or a clean InputError.

Inputs are drawn near the valid ones (known keys, registered techniques, TOML value types
including NaN and infinities) as well as far from them, so the checks behind the first
layer of validation are reached too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.matrix import TOP_KEYS, Matrix, parse_matrix
from bench.results import read_records, read_run
from optimize.errors import InputError
from optimize.recipe import Recipe
from optimize.registry import recipe_from_dict, techniques, variant_names

EXAMPLES = {"matrix": 300, "recipe": 300, "records": 300, "run": 200}


def fuzz(kind: str) -> settings:
    return settings(max_examples=EXAMPLES[kind], deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# TOML's value types: booleans, integers, floats (NaN and infinities included), strings, arrays, tables.
scalars = st.one_of(st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "false", "true", "fp32", "cpu", "auto", "generate", "../x", "a\0b", "nan"]),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _plausible(default):
    """Values of the default's type (often valid), sometimes anything at all."""
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(-2, 300)
    elif isinstance(default, float):
        typed = st.one_of(st.floats(-1, 10), st.sampled_from([math.nan, math.inf, -math.inf]))
    elif isinstance(default, str):
        typed = st.sampled_from(["float16", "bfloat16", "int8-weight-only", "layer", "global", "static", "x"])
    else:
        typed = values
    return st.one_of(st.just(default), typed, values)


def _step_tables():
    classes = techniques()

    def table(name: str):
        fields = {f.name: _plausible(f.default) for f in dataclasses.fields(classes[name])}
        optional = {**fields, "sparsty": values}
        return st.fixed_dictionaries({"technique": st.just(name)}, optional=optional)

    return st.one_of(*(table(n) for n in sorted(classes)), values)


steps = _step_tables()
recipes = st.one_of(
    st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["mine", "fp32", ""]), scalars)},
                          optional={"steps": st.one_of(st.lists(steps, max_size=3), values),
                                    "description": st.one_of(st.text(max_size=5), values)}),
    values)
scenario_keys = st.sampled_from(["name", "batch_size", "prompt_tokens", "new_tokens", "memory_percent", "bacth"])
scenarios = st.one_of(
    st.lists(st.dictionaries(scenario_keys, st.one_of(st.sampled_from(["generate", "prefill", "decode"]),
                                                      st.integers(-1, 600), st.lists(st.integers(-1, 600),
                                                                                     max_size=3), values),
                             max_size=4), max_size=2),
    values)
measure_keys = st.sampled_from(["warmup", "min_reps", "max_reps", "budget_s", "timeout_s", "seed", "roofline", "x"])
core_tables = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["ok-name", "../../evil", ".hidden"]), scalars),
    "description": values,
    "models": st.one_of(st.sampled_from([["synthetic:llama-tiny"], ["builtin:pycode"], ["synthetic:nope"]]), values),
    "variants": st.one_of(st.lists(st.sampled_from([*variant_names()[:6], "mine", "fp23"]), max_size=3), values),
    "devices": st.one_of(st.lists(st.sampled_from(["cpu", "auto", "cuda", "tpu"]), max_size=2), values),
    "scenarios": scenarios,
    "measure": st.one_of(st.dictionaries(measure_keys, values, max_size=4), values),
    "drift": st.one_of(st.dictionaries(st.sampled_from(["context", "enabled", "budget", "max_tokens", "y"]), values,
                                       max_size=3), values),
    "recipe": st.one_of(st.lists(recipes, max_size=2), values),
    "exclude": st.one_of(st.lists(st.dictionaries(st.sampled_from(["model", "variant", "device", "name", "batch_size",
                                                                   "prompt_tokens", "new_tokens", "varient"]), values,
                                                  min_size=1, max_size=2), max_size=2), values),
    "trust_remote_code": values,
    "eval_text": values,
})
# One table in ten also carries a misspelt key.
matrix_tables = st.tuples(core_tables, st.integers(0, 9), values).map(
    lambda t: {**t[0], "stpes": t[2]} if t[1] == 0 else t[0])
recipes = st.one_of(recipes, recipes.map(lambda r: {**r, "stpes": []} if isinstance(r, dict) else r))


@fuzz("matrix")
@given(data=matrix_tables)
def test_matrix_parser_returns_a_matrix_or_raises_input_error(data):
    assert set(data) <= TOP_KEYS | {"stpes"}
    try:
        matrix = parse_matrix(data, "fuzz.toml")
    except InputError:
        return
    assert isinstance(matrix, Matrix)
    assert isinstance(matrix.trust_remote_code, bool)
    assert all(math.isfinite(v) for v in dataclasses.asdict(matrix.measure.repeat).values())
    assert math.isfinite(matrix.measure.timeout_s) and matrix.measure.timeout_s > 0
    assert "/" not in matrix.name and not matrix.name.startswith(".")


@fuzz("recipe")
@given(data=recipes)
def test_recipe_parser_returns_a_recipe_or_raises_input_error(data):
    try:
        recipe = recipe_from_dict(data, "fuzz")
    except InputError:
        return
    assert isinstance(recipe, Recipe) and recipe.name
    for step in recipe.steps:
        for f in dataclasses.fields(step):
            value = getattr(step, f.name)
            assert not (isinstance(value, float) and not math.isfinite(value)), (step, f.name)
            assert isinstance(f.default, bool) == isinstance(value, bool), (step, f.name)
    json.dumps(recipe.to_dict(), allow_nan=False)  # what gets hashed and stored must be plain JSON


GOOD = {"schema_version": 1, "model": "m", "variant": "v", "recipe": {"name": "v", "steps": []}, "device": "cpu",
        "scenario": {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 4}, "status": "failed",
        "error": "boom", "metrics": {}, "samples": {}, "method": {}, "labels": [], "timing_s": {}}
good_line = st.fixed_dictionaries({"cell_id": st.from_regex(r"[0-9a-f]{16}", fullmatch=True)},
                                  optional={"extra": values, "labels": st.lists(st.text(max_size=4), max_size=2)}
                                  ).map(lambda r: json.dumps({**GOOD, **r}, allow_nan=True).encode())
lines = st.one_of(good_line, st.binary(max_size=40), values.map(lambda v: json.dumps(v, allow_nan=True).encode()))


@fuzz("records")
@given(chunks=st.lists(lines, max_size=8), tail=st.binary(max_size=20))
def test_results_loader_keeps_every_good_line_whatever_surrounds_it(tmp_path_factory, chunks, tail):
    run_dir = tmp_path_factory.mktemp("fuzz")
    (run_dir / "results.jsonl").write_bytes(b"\n".join(chunks) + b"\n" + tail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt lines are reported by a warning; here only the result counts
        records = read_records(run_dir, latest_only=False)
    assert all(isinstance(r, dict) and isinstance(r["cell_id"], str) and isinstance(r["status"], str)
               for r in records)
    # a record repeated whole is read once (one measurement read twice is not two)
    expected = len({json.dumps(json.loads(c), sort_keys=True) for c in chunks if b"\n" not in c and _is_record(c)})
    assert len(records) >= expected


def _is_record(raw: bytes) -> bool:
    """A whole record by the published schema, in JSON without NaN or infinities: the loader must keep it."""
    import jsonschema

    from bench.results import validate_record

    def no_constant(name):
        raise ValueError(name)

    try:
        rec = json.loads(raw.decode(), parse_constant=no_constant)
        json.dumps(rec, ensure_ascii=False).encode()  # a lone surrogate cannot be text
        if any((isinstance(x, float) and not math.isfinite(x)) or (isinstance(x, int) and abs(x) >= 2**63)
               for x in _leaves(rec)):
            return False
        validate_record(rec)
    except (UnicodeError, ValueError, jsonschema.ValidationError):
        return False
    return True


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@fuzz("run")
@given(content=st.one_of(st.binary(max_size=60), values.map(lambda v: json.dumps(v, allow_nan=True).encode())))
def test_run_json_reader_returns_a_run_or_raises_input_error(tmp_path_factory, content):
    run_dir = tmp_path_factory.mktemp("fuzz")
    (run_dir / "run.json").write_bytes(content)
    try:
        run = read_run(run_dir)
    except InputError:
        return
    assert isinstance(run, dict) and isinstance(run["matrix"], dict)


@pytest.mark.parametrize("text", ["[[recipe]]\nname = 'x'\n[[recipe]]\nname = 'x'", "a = nan\n", "= = =",
                                  "models = [1, 'a']", "[measure]\nbudget_s = -inf"])
def test_matrix_file_text_ends_in_a_matrix_or_input_error(tmp_path, text):
    from bench.matrix import load_matrix

    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(InputError):
        load_matrix(path)
