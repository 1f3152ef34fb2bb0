"""Matrix files: validation, narrowing with flags, expansion and exclusion."""

from __future__ import annotations

import pytest

from bench.matrix import expand, load_matrix, narrow, parse_matrix
from optimize.errors import InputError


def cpu(_: str) -> str:
    return "cpu"


def test_default_matrix_is_valid_and_uses_builtin_model():
    m = load_matrix()
    assert m.models == ("builtin:pycode",)
    assert "fp32" in m.variants


def test_cells_are_the_cross_product_minus_exclusions():
    m = parse_matrix({
        "models": ["synthetic:llama-tiny"], "variants": ["fp32", "bf16"],
        "scenarios": [{"name": "generate", "batch_size": [1, 4], "prompt_tokens": 32, "new_tokens": 8}],
        "exclude": [{"variant": "bf16", "batch_size": 4}],
    }, "m.toml")
    cells = expand(m, cpu)
    got = {(c.recipe.name, c.scenario.batch_size) for c in cells}
    assert got == {("fp32", 1), ("fp32", 4), ("bf16", 1)}
    assert len({c.cell_id for c in cells}) == 3


def test_inline_recipe_is_usable_as_variant():
    m = parse_matrix({"variants": ["mine"], "recipe": [
        {"name": "mine", "steps": [{"technique": "prune-magnitude", "sparsity": 0.3}, {"technique": "cast"}]}]}, "m")
    assert [s.technique for s in m.recipe("mine").steps] == ["prune-magnitude", "cast"]


@pytest.mark.parametrize("data, message", [
    ({"variants": ["fp32"], "devices": ["tpu"]}, "'devices' must be among"),
    ({"scenarios": [{"name": "generate", "batch_size": [0]}]}, "batch_size must be >= 1, got 0"),
    ({"scenarios": [{"name": "generate", "batch_size": [1, "2"]}]}, "'batch_size' must be an integer or a non-empty"),
    ({"scenarios": [{"name": "decode", "memory_percent": 0}]}, "memory_percent must be in 1..100 (percent of the "
                                                               "memory available when the cell starts), got 0"),
    ({"scenarios": [{"name": "decode", "memory_percent": [80, 150]}]}, "memory_percent must be in 1..100"),
    ({"scenarios": [{"name": "decode", "memory_percent": 101}]}, "memory_percent must be in 1..100"),
    ({"scenarios": [{"name": "nope"}]}, "'name' must be one of"),
    ({"measure": {"min_reps": 5, "max_reps": 2}}, "file.toml [measure]: 'min_reps' must be <= 'max_reps' (2), got 5"),
    ({"measure": {"warmups": 1}}, "'warmups' is not a measure setting (did you mean 'warmup'?)"),
    ({"scenarios": [{"name": "generate", "batch": [1]}]},
     "'batch' is not a generate setting (did you mean 'batch_size'?)"),
    ({"variants": ["x"], "recipe": [{"name": "x", "steps": [{"technique": "prune-magnitude", "sparsity": 2.0}]}]},
     "sparsity must be in (0, 1)"),
    ({"variants": ["x"], "recipe": [{"name": "x", "steps": [{"technique": "prune-magnitud"}]}]},
     "did you mean 'prune-magnitude'"),
    ({"variants": ["x"], "recipe": [{"name": "x", "steps": [{"technique": "cast", "dtype": "float16"},
                                                            {"technique": "prune-magnitude"}]}]},
     "steps must go weights -> export -> graph -> runtime"),
])
def test_invalid_matrices_name_file_and_key(data, message):
    with pytest.raises(InputError) as exc:
        parse_matrix(data, "file.toml")
    assert message in str(exc.value)
    assert "file.toml" in str(exc.value) or "variant" in str(exc.value)


@pytest.mark.parametrize("data, message", [
    ({"variants": ["fp32", "bf16", "fp32"]}, "file.toml: 'variants' lists 'fp32' twice"),
    ({"models": ["builtin:pycode", "builtin:pycode"]}, "'models' lists 'builtin:pycode' twice"),
    ({"devices": ["cpu", "cpu"]}, "'devices' lists 'cpu' twice"),
    ({"scenarios": [{"name": "generate", "batch_size": [1, 4, 1]}]}, "scenarios[0]: 'batch_size' lists 1 twice"),
])
def test_a_list_naming_something_twice_is_refused_not_measured_once_in_silence(data, message):
    with pytest.raises(InputError) as exc:
        parse_matrix(data, "file.toml")
    assert message in str(exc.value)


def test_devices_that_resolve_to_one_device_are_one_device():
    """auto and cpu are two names, not a typo: on a CPU host they are one device, measured once."""
    m = parse_matrix({"devices": ["auto", "cpu"]}, "file.toml")
    assert {c.device for c in expand(m, cpu)} == {"cpu"} and len(expand(m, cpu)) == len(
        expand(parse_matrix({}, "file.toml"), cpu))


def test_a_flag_naming_a_size_twice_is_refused_with_the_flag_source():
    with pytest.raises(InputError) as exc:
        narrow(load_matrix(), batch_size=[2, 2])
    assert "(with the command-line flags) scenarios[0]: 'batch_size' lists 2 twice" in str(exc.value)


def test_flags_narrow_the_matrix():
    m = narrow(load_matrix(), models=["synthetic:llama-tiny"], variants=["bf16"], batch_size=[1, 8],
               new_tokens=[4], repeat={"min_reps": 2})
    cells = expand(m, cpu)
    assert {c.scenario.batch_size for c in cells} == {1, 8}
    assert all(c.scenario.new_tokens == 4 and c.model == "synthetic:llama-tiny" for c in cells)
    assert m.measure.repeat.min_reps == 2


def test_prefill_and_decode_sweeps_expand_over_their_axes():
    m = parse_matrix({"models": ["synthetic:llama-tiny"], "variants": ["fp32"], "scenarios": [
        {"name": "prefill", "prompt_tokens": [32, 64, 128]},
        {"name": "decode", "batch_size": [1, 2, 4], "prompt_tokens": 16, "new_tokens": 8, "memory_percent": 50}]},
        "sweep.toml")
    cells = expand(m, cpu)
    prefill = sorted(c.scenario.prompt_tokens for c in cells if c.scenario.name == "prefill")
    decode = sorted(c.scenario.batch_size for c in cells if c.scenario.name == "decode")
    assert prefill == [32, 64, 128] and decode == [1, 2, 4]
    assert all(c.scenario.to_dict()["new_tokens"] == 1 for c in cells if c.scenario.name == "prefill")
    assert all(c.scenario.memory_percent == 50 for c in cells if c.scenario.name == "decode")


def test_decode_memory_percent_takes_the_bounds_of_1_to_100():
    m = parse_matrix({"models": ["synthetic:llama-tiny"], "variants": ["fp32"], "scenarios": [
        {"name": "decode", "batch_size": 1, "memory_percent": [1, 100]}]}, "bounds.toml")
    assert sorted(c.scenario.memory_percent for c in expand(m, cpu)) == [1, 100]


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_measure_threads_must_be_a_whole_number(value):
    with pytest.raises(InputError, match=r"\[measure\].*threads"):
        parse_matrix({"name": "t", "models": ["synthetic:llama-tiny"], "variants": ["fp32"],
                      "measure": {"threads": value}}, "t.toml")


def test_threads_reach_every_cell_from_the_file_or_the_flag():
    base = {"name": "t", "models": ["synthetic:llama-tiny"], "variants": ["fp32"], "devices": ["cpu"]}
    assert all(c.measure.threads == 0 for c in expand(parse_matrix(base, "t.toml")))  # torch's default
    matrix = parse_matrix({**base, "measure": {"threads": 3}}, "t.toml")
    assert all(c.measure.threads == 3 for c in expand(matrix))
    assert all(c.measure.threads == 1 for c in expand(narrow(matrix, threads=1)))
    with pytest.raises(InputError, match="threads must be a whole number"):
        narrow(matrix, threads=-2)
