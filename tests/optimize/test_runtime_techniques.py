"""Runtime techniques: casts, dynamic int8, KV-cache variants (lossless ones match the reference)."""

from __future__ import annotations

import pytest
import torch

from bench.metrics.memory import torch_weights_bytes
from bench.scenarios.generate import greedy_generate
from optimize.errors import NotApplicable, RecipeError
from optimize.kvcache import KVCache
from optimize.recipe import Recipe
from optimize.registry import builtin_variant
from optimize.store import VariantStore, load_variant

NEW = 12


def _load(ref, cache_dir, variant: str):
    state, _ = load_variant(ref, builtin_variant(variant), "cpu", VariantStore(cache_dir))
    return state


@pytest.fixture(scope="module")
def reference_tokens(tiny_ref, cache_dir):
    from bench.prompts import prompt_ids

    prompts, _ = prompt_ids(tiny_ref, 8192, 2, 16)
    return prompts, greedy_generate(_load(tiny_ref, cache_dir, "fp32"), prompts, NEW)


@pytest.mark.parametrize("variant", ["no-kv-cache", "static-kv", "onnx-fp32"])
def test_lossless_variants_reproduce_reference_greedy_tokens(variant, tiny_ref, cache_dir, reference_tokens):
    prompts, expected = reference_tokens
    state = _load(tiny_ref, cache_dir, variant)
    assert torch.equal(greedy_generate(state, prompts, NEW).cpu(), expected)


def test_bf16_cast_changes_dtype_and_halves_weights(tiny_ref, cache_dir):
    fp32 = _load(tiny_ref, cache_dir, "fp32")
    bf16 = _load(tiny_ref, cache_dir, "bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert torch_weights_bytes(bf16.model) * 2 == torch_weights_bytes(fp32.model)


def test_fp16_on_cpu_is_not_applicable(tiny_ref, cache_dir):
    with pytest.raises(NotApplicable, match="fp16 needs CUDA"):
        _load(tiny_ref, cache_dir, "fp16")


def test_dynamic_int8_replaces_linears_with_int8_weights(tiny_ref, cache_dir, reference_tokens):
    state = _load(tiny_ref, cache_dir, "torch-int8-dynamic")
    quantized = [m for m in state.model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert len(quantized) == 2 * 7 + 1  # q k v o gate up down per layer, plus the LM head
    assert quantized[0].weight().dtype == torch.qint8
    fp32 = _load(tiny_ref, cache_dir, "fp32")
    linear_weights = sum(m.weight.numel() for m in fp32.model.modules() if isinstance(m, torch.nn.Linear))
    # each linear weight goes from 4 bytes to 1; the embedding table stays fp32
    expected = torch_weights_bytes(fp32.model) - 3 * linear_weights
    assert torch_weights_bytes(state.model) == pytest.approx(expected, rel=0.01)
    prompts, _ = reference_tokens
    assert greedy_generate(state, prompts, NEW).shape == (2, 16 + NEW)


def test_kv_int4_generates_with_a_quantized_cache(tiny_ref, cache_dir, reference_tokens):
    pytest.importorskip("optimum.quanto", reason="kv-int4 needs optimum-quanto")
    state = _load(tiny_ref, cache_dir, "kv-int4")
    assert state.generate_kwargs["cache_implementation"] == "quantized"
    prompts, _ = reference_tokens
    assert greedy_generate(state, prompts, NEW).shape == (2, 16 + NEW)


def test_kv_cache_config_validation():
    with pytest.raises(RecipeError):
        Recipe(name="x", steps=(KVCache(mode="dynamic", compile=True),))
    with pytest.raises(RecipeError):
        Recipe(name="x", steps=(KVCache(mode="quantized", nbits=3),))
