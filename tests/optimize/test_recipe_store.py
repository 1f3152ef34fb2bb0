"""Recipes serialise and hash stably; the store builds once, reuses, and writes safe formats only."""

from __future__ import annotations

import json
import re

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from optimize.errors import RecipeError
from optimize.prune.magnitude import MagnitudePrune
from optimize.quantize.cast import Cast
from optimize.recipe import Recipe
from optimize.registry import builtin_variant, recipe_from_dict, techniques, variants
from optimize.store import VariantStore


def test_recipe_round_trips_through_toml():
    recipe = Recipe(name="mine", steps=(MagnitudePrune(sparsity=0.3, scope="global"), Cast(dtype="bfloat16")))
    steps = ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.to_dict().items()) + "}"
                      for s in recipe.steps)
    data = tomllib.loads(f'name = "mine"\nsteps = [{steps}]\n')
    again = recipe_from_dict(data)
    assert again == recipe and again.content_hash() == recipe.content_hash()


def test_content_hash_depends_on_steps_not_name():
    a = Recipe(name="a", steps=(MagnitudePrune(sparsity=0.5),))
    assert a.content_hash() == Recipe(name="b", steps=(MagnitudePrune(sparsity=0.5),)).content_hash()
    assert a.content_hash() != Recipe(name="a", steps=(MagnitudePrune(sparsity=0.4),)).content_hash()


def test_steps_out_of_stage_order_are_rejected():
    with pytest.raises(RecipeError, match="weights -> export -> graph -> runtime"):
        Recipe(name="x", steps=(Cast(), MagnitudePrune()))


@pytest.mark.parametrize(("name", "dtype"), [
    ("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"), ("torch-int8-dynamic", "int8"),
    ("torchao-int8-wo", "float32"),  # weight-only: dequantized to the activations' dtype
    ("torchao-int4-wo", "bfloat16"), ("bnb-int8", "int8"), ("bnb-nf4", "float32"), ("onnx-fp32", "float32"),
    ("onnx-fp16", "float16"), ("onnx-int8-dynamic", "int8"), ("onnx-int8-static", "int8"),
    ("prune-2of4", "float32"), ("prune-2of4-fp16", "float16"), ("static-kv", "float32"), ("kv-int4", "float32")])
def test_a_recipe_says_what_its_matrix_products_compute_in(name, dtype):
    assert builtin_variant(name).matmul_dtype("cuda") == dtype


def test_on_the_cpu_bnb_nf4_computes_in_what_bitsandbytes_runs_there(monkeypatch):
    from optimize.quantize import bnb

    monkeypatch.setattr(bnb, "_cpu_repacks_4bit", lambda: True)  # an AVX512-BF16 CPU: its 4-bit kernel is bf16
    assert builtin_variant("bnb-nf4").matmul_dtype("cpu") == "bfloat16"
    assert builtin_variant("bnb-nf4").matmul_dtype("cuda") == "float32"
    assert builtin_variant("fp32").matmul_dtype("cpu") == "float32"
    monkeypatch.setattr(bnb, "_cpu_repacks_4bit", lambda: False)
    assert builtin_variant("bnb-nf4").matmul_dtype("cpu") == "float32"


def test_the_last_step_that_changes_the_arithmetic_decides_it():
    from optimize.quantize.bnb import BnbNF4
    from optimize.quantize.torchao import TorchAO

    assert Recipe(name="x", steps=(BnbNF4(compute_dtype="bfloat16"),)).matmul_dtype("cuda") == "bfloat16"
    assert Recipe(name="x", steps=(Cast(dtype="bfloat16"), TorchAO(scheme="int8-weight-only"))).matmul_dtype("cpu") == \
        "bfloat16"
    assert Recipe(name="x", steps=(Cast(dtype="bfloat16"), TorchAO(scheme="int8-dynamic"))).matmul_dtype("cpu") == \
        "int8"


@pytest.mark.parametrize(("setting", "message"), [
    ({"include_lm_head": "no"}, "include_lm_head must be true or false (a TOML boolean, unquoted), got 'no'"),
    ({"include_lm_head": 1}, "include_lm_head must be true or false (a TOML boolean, unquoted), got 1"),
    ({"version": True}, "version must be a whole number, got true"),  # TOML's spelling, not Python's True
])
def test_a_step_setting_of_the_wrong_type_says_what_toml_it_takes(setting, message):
    step = {"technique": "torch-int8-dynamic", **setting}
    with pytest.raises(RecipeError, match=f"step 0: torch-int8-dynamic.{re.escape(message)}$"):
        recipe_from_dict({"name": "r", "steps": [step]}, "recipe[0]")


def test_every_builtin_variant_uses_registered_techniques():
    known = techniques()
    for name, info in variants().items():
        assert info.applies and info.recipe.description, name
        assert all(s.technique in known for s in info.recipe.steps), name


def test_store_builds_once_and_reuses(tiny_ref, cache_dir):
    store = VariantStore(cache_dir)
    recipe = builtin_variant("prune-50")
    first = store.get_or_build(tiny_ref, recipe, "cpu")
    second = store.get_or_build(tiny_ref, recipe, "cpu")
    assert second.reused and second.path == first.path
    m = second.manifest
    # content-addressed: the saved steps identify the artifact, whatever the recipe was called
    assert m["saved_steps"] == [s.to_dict() for s in recipe.saved_steps]
    weights = sum(p.stat().st_size for p in first.path.rglob("*.safetensors"))
    on_disk = sum(p.stat().st_size for p in first.path.rglob("*") if p.is_file())
    assert weights <= m["artifact_bytes"] <= on_disk  # the saved files, manifest aside
    assert m["build_s"] >= 0
    assert m["reports"][0]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert {"torch", "transformers"} <= set(m["versions"])
    suffixes = {p.suffix for p in first.path.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pkl", ".pickle"}


def test_store_key_changes_with_the_recipe(tiny_ref, cache_dir):
    store = VariantStore(cache_dir)
    a = store.key(tiny_ref, Recipe(name="a", steps=(MagnitudePrune(sparsity=0.5),)), "cpu")
    b = store.key(tiny_ref, Recipe(name="a", steps=(MagnitudePrune(sparsity=0.6),)), "cpu")
    assert a != b


def test_runtime_only_recipes_need_no_artifact(tiny_ref, cache_dir):
    art = VariantStore(cache_dir).get_or_build(tiny_ref, builtin_variant("bf16"), "cpu")
    assert str(art.path) == tiny_ref.path


def test_graph_steps_start_from_the_stored_export(tiny_ref, cache_dir):
    store = VariantStore(cache_dir)
    export = store.get_or_build(tiny_ref, builtin_variant("onnx-fp32"), "cpu")
    quantized = store.get_or_build(tiny_ref, builtin_variant("onnx-int8-dynamic"), "cpu")
    assert quantized.manifest["built_from_prefix"] == str(export.path)
    assert [r["technique"] for r in quantized.manifest["reports"]] == ["onnx-export", "ort-int8-dynamic"]
    assert quantized.manifest["artifact_bytes"] < export.manifest["artifact_bytes"]
