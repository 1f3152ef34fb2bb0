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


def test_kv_bytes_per_token_follow_the_cache_each_variant_keeps(tiny_ref, cache_dir):
    """The tiny Llama: 2 layers x K and V x 2 KV heads x head dim 32; none for a variant that keeps no cache."""
    from bench.metrics.roofline_cell import kv_bytes_per_token
    from bench.scenarios.generate import GenerateScenario

    scenario = GenerateScenario(batch_size=1, prompt_tokens=16, new_tokens=8)
    per_element = 2 * 2 * 2 * 32
    assert kv_bytes_per_token(_load(tiny_ref, cache_dir, "fp32"), scenario) == per_element * 4
    assert kv_bytes_per_token(_load(tiny_ref, cache_dir, "bf16"), scenario) == per_element * 2
    assert kv_bytes_per_token(_load(tiny_ref, cache_dir, "static-kv"), scenario) == per_element * 4
    assert kv_bytes_per_token(_load(tiny_ref, cache_dir, "no-kv-cache"), scenario) == 0.0
    # 4 bits an element, plus an fp32 scale and zero point per 64 elements: 0.625 bytes for the prompt's 16
    # tokens; the k tokens decoded so far stay fp32 (fewer than residual_length = 128): mean over steps 1..7.
    held = sum(per_element * 0.625 * 16 + per_element * 4 * k for k in range(1, 8))
    contexts = sum(16 + k for k in range(1, 8))
    assert kv_bytes_per_token(_load(tiny_ref, cache_dir, "kv-int4"), scenario) == held / contexts
    # The cache's own settings: 2 bits, and a full-precision tail quantized with the rest at its 4th token.
    kv2 = Recipe(name="kv2-r4", steps=(KVCache(mode="quantized", nbits=2, residual_length=4),))
    state, _ = load_variant(tiny_ref, kv2, "cpu", VariantStore(cache_dir))
    tails = [1, 2, 3, 0, 1, 2, 3]  # after decode steps 1..7; step 4 quantizes the prompt's 16 and 4 decoded tokens
    quantized = [16, 16, 16, 20, 20, 20, 20]
    held = sum(per_element * (0.375 * q + 4 * t) for q, t in zip(quantized, tails, strict=True))  # 2 bits + 8/64
    assert kv_bytes_per_token(state, scenario) == held / contexts


def test_a_quantized_cache_is_measured_through_its_flushes_to_the_quantized_part(tiny_ref, cache_dir):
    """residual_length 4: the full-precision tail grows to 3 tokens, then the 4th step quantizes all of it."""
    from optimize.introspect import kv_geometry, quantized_kv_bytes_per_token

    model = _load(tiny_ref, cache_dir, "fp32").model
    per_token = 2 * 32  # one layer's K (or V): 2 KV heads x head dim 32
    quantized, tail, held, contexts = 8, 0, [], []
    for step in range(1, 10):
        if tail > 0 and tail + 1 >= 4:
            quantized, tail = quantized + tail + 1, 0
        else:
            tail += 1
        held.append(2 * 2 * (quantized * per_token * 0.625 + tail * per_token * 4))  # 2 layers, K and V
        contexts.append(8 + step)
    config = {"backend": "quanto", "nbits": 4, "residual_length": 4}
    assert quantized_kv_bytes_per_token(model, kv_geometry(model), config, 8, 10) == sum(held) / sum(contexts)
    assert quantized_kv_bytes_per_token(model, kv_geometry(model), config, 8, 1) == 2 * 2 * per_token * 0.625


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
    prompts, expected = reference_tokens
    _, scores = _scores(state, prompts)
    _, reference = _scores(_load(tiny_ref, cache_dir, "fp32"), prompts)
    assert not torch.equal(scores, reference)  # int8 arithmetic really ran
    corr = torch.corrcoef(torch.stack([scores.flatten(), reference.flatten()]))[0, 1]
    assert corr > 0.99, corr
    assert (scores[0].argmax(-1) == expected[:, 16]).all()  # same first token as fp32


class ScoreRecorder:
    """A logits processor keeping each step's scores (B, V)."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().float().clone())
        return scores


def _scores(state, prompts):
    """Greedy tokens and each step's scores (NEW, B, V); tokens the generation config bans (-inf) set to 0."""
    recorder = ScoreRecorder()
    tokens = greedy_generate(state, prompts, NEW, [recorder])
    scores = torch.stack(recorder.steps)
    return tokens, torch.where(scores.isfinite(), scores, torch.zeros(()))


def test_kv_int4_generates_through_a_quantized_cache(tiny_ref, cache_dir, reference_tokens):
    """With a residual window shorter than the prompt, later steps read int4 keys and values: their
    logits move away from the full-precision cache's, while the prefill step (which attends to the
    fresh keys) is unchanged."""
    pytest.importorskip("optimum.quanto", reason="kv-int4 needs optimum-quanto")
    builtin = _load(tiny_ref, cache_dir, "kv-int4")
    assert builtin.generate_kwargs["cache_implementation"] == "quantized"
    assert builtin.generate_kwargs["cache_config"] == {"backend": "quanto", "nbits": 4, "residual_length": 128}
    prompts, expected = reference_tokens
    state, _ = load_variant(tiny_ref, Recipe(name="kv4-r4", steps=(KVCache(mode="quantized", nbits=4,
                                                                             residual_length=4),)),
                            "cpu", VariantStore(cache_dir))
    assert "KV cache int4 (quanto), last 4 tokens full precision" in state.labels
    tokens, scores = _scores(state, prompts)
    _, reference = _scores(_load(tiny_ref, cache_dir, "fp32"), prompts)
    assert torch.allclose(scores[0], reference[0], atol=1e-5)  # prefill: the fresh keys, not the stored ones
    assert (scores[1:] - reference[1:]).abs().max() > 1e-3  # decode steps read the quantized cache
    assert (tokens[:, 16] == expected[:, 16]).all()  # first generated token identical
    # The int4 cache is lossy, not broken: its logits still follow the full-precision ones.
    corr = torch.corrcoef(torch.stack([scores[1:].flatten(), reference[1:].flatten()]))[0, 1]
    assert corr > 0.9, corr


def test_kv_cache_config_validation():
    with pytest.raises(RecipeError, match="kv-cache"):
        Recipe(name="x", steps=(KVCache(mode="dynamic", compile=True),))
    with pytest.raises(RecipeError, match="kv-cache.nbits must be 2 or 4 for the quanto backend, got 3"):
        Recipe(name="x", steps=(KVCache(mode="quantized", nbits=3),))
