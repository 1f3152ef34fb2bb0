"""Drift scored through the variant's KV cache: teacher-forced decoding, checked against independent paths."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.metrics.drift import DriftConfig, ensure_reference, measure_drift
from bench.metrics.drift_incremental import CacheScorer, batch_windows, resolve_scoring
from optimize.errors import InputError

# 8 windows of 64 tokens; the quantized cache below keeps 16 positions in full precision,
# so most scored tokens are predicted from a partly quantized cache.
SMALL = DriftConfig(context=64, max_tokens=512, batch_windows=4, gen_prompts=2, gen_prompt_tokens=16,
                    gen_new_tokens=8)
THROUGH = replace(SMALL, scoring="through-cache")
RESIDUAL = 16


@pytest.fixture(scope="module")
def reference(tiny_ref, cache_dir):
    return ensure_reference(tiny_ref, SMALL, cache_dir)


@pytest.fixture(scope="module")
def load(tiny_ref, cache_dir):
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    def load_steps(*steps):
        state, _ = load_variant(tiny_ref, Recipe(name="under-test", steps=steps), "cpu", VariantStore(cache_dir))
        return state

    return load_steps


@pytest.fixture(scope="module")
def builtin(cache_dir):
    """The built-in trained model and its reference: a random model's attention is too flat for
    damaged or quantized keys to move its predictions much."""
    from optimize.models import resolve_model

    ref = resolve_model("builtin:pycode", cache_dir)
    return ref, ensure_reference(ref, SMALL, cache_dir)


def _load(ref, cache_dir, *steps):
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    return load_variant(ref, Recipe(name="under-test", steps=steps), "cpu", VariantStore(cache_dir))[0]


@pytest.fixture(scope="module")
def quantized_kv(builtin, cache_dir):
    """Drift of a 4-bit quanto KV cache with a 16-token full-precision residual, scored with ``auto``."""
    pytest.importorskip("optimum.quanto", reason="the quantized KV cache needs optimum-quanto")
    from optimize.kvcache import KVCache

    ref, reference = builtin
    state = _load(ref, cache_dir, KVCache(mode="quantized", nbits=4, residual_length=RESIDUAL))
    return measure_drift(state, reference, SMALL)


def _forgetful_cache_class(keep: int):
    """A dynamic cache that zeroes every stored key older than the ``keep`` most recent positions."""
    from transformers import DynamicCache

    class ForgetfulCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
            if keys.shape[-2] > keep:
                self.layers[layer_idx].keys[..., : keys.shape[-2] - keep, :] = 0.0  # (B, kv heads, T, head dim)
                keys = self.layers[layer_idx].keys
            return keys, values

    return ForgetfulCache


def test_full_window_and_through_cache_agree_on_fp32(load, reference):
    state = load()
    full, through = measure_drift(state, reference, SMALL), measure_drift(state, reference, THROUGH)
    assert full["drift_method"]["scoring"] == "full-window" and through["drift_method"]["scoring"] == "through-cache"
    assert full["drift_through_cache"] is False and through["drift_through_cache"] is True
    assert through["scored_tokens"] == full["scored_tokens"] == 8 * 63
    assert through["kld_mean"] < 1e-6 and through["kld_max"] < 1e-5
    assert through["top1_agreement"] >= 0.999
    assert through["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    method = through["drift_method"]["through_cache"]
    assert method["cache"]["class"] == "DynamicCache"
    assert method["prefill_tokens"] == 1 and method["chunk_tokens"] == 1 and method["steps_per_window"] == 63
    assert method["scored_tokens_reading_quantized"] == 0 and through["drift_kv_quantized_scored_tokens"] == 0


def test_cache_scorer_logprobs_match_a_plain_forward_on_fp32(load, reference):
    """Row for row, the teacher-forced path reproduces the full-window log-probs of the same model."""
    from safetensors import safe_open

    from bench.metrics.drift import REFERENCE_TENSORS

    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        windows = f.get_tensor("windows")[:3]
    state = load()
    [(start, through)] = list(CacheScorer(state).logprob_batches(windows))
    with torch.no_grad():
        full = torch.log_softmax(state.model(input_ids=windows, use_cache=False).logits[:, :-1].float(), -1)
    assert start == 0 and through.shape == full.shape == (3, 63, 8192)
    torch.testing.assert_close(through, full, atol=1e-4, rtol=1e-4)


def test_damaged_cache_shows_through_the_cache_and_not_in_full_windows(builtin, cache_dir):
    from transformers import AutoConfig

    ref, reference = builtin
    state = _load(ref, cache_dir)
    config = AutoConfig.from_pretrained(state.source_dir)
    forgetful = _forgetful_cache_class(keep=8)
    damaged = measure_drift(state, reference, THROUGH, cache_factory=lambda: forgetful(config=config))
    blind = measure_drift(state, reference, SMALL, cache_factory=lambda: forgetful(config=config))
    assert damaged["drift_method"]["through_cache"]["cache"]["class"] == "ForgetfulCache"
    assert blind["kld_mean"] < 1e-6 and blind["top1_agreement"] == 1.0  # the full-window pass reads no cache
    assert damaged["kld_mean"] > 0.1 and damaged["kld_mean"] > 1e5 * max(blind["kld_mean"], 1e-9)
    assert damaged["top1_agreement"] < 0.9


@pytest.mark.slow
def test_quantized_cache_drift_is_seen_and_counted(quantized_kv):
    m = quantized_kv
    assert m["drift_through_cache"] is True
    assert m["drift_method"]["scoring_reason"] == "step 'kv-cache' changes the KV cache"
    assert m["kld_mean"] > 1e-4 and m["top1_agreement"] < 1.0
    method = m["drift_method"]["through_cache"]
    assert method["cache"]["layer_class"] == "QuantoQuantizedLayer"
    assert method["cache"]["nbits"] == 4 and method["cache"]["residual_length"] == RESIDUAL
    # transformers quantizes the prefill at once: every decode step (all but one of each window's
    # 63 scored tokens) reads quantized keys and values.
    assert method["scored_tokens_reading_quantized"] == m["drift_kv_quantized_scored_tokens"] == 8 * 62
    assert method["quantized_positions_read_mean"] > RESIDUAL


@pytest.mark.slow
def test_quantized_cache_kld_matches_plain_transformers_fed_token_by_token(builtin, quantized_kv):
    """Independent: transformers' own quanto cache, one window and one token at a time, no harness code."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, QuantizedCache

    from bench.metrics.drift import REFERENCE_TENSORS
    from tests.bench.test_drift import _independent_windows

    windows = _independent_windows()[: SMALL.max_tokens // SMALL.context]
    with safe_open(str(builtin[1] / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), windows)  # the same text as the harness scored
    model = AutoModelForCausalLM.from_pretrained(builtin[0].path, dtype=torch.float32).eval()
    klds = []
    with torch.no_grad():
        for w in windows:
            full = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1)  # (T-1, V)
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=4, residual_length=RESIDUAL)
            steps = [model(input_ids=w[None, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                     for t in range(len(w) - 1)]
            incremental = torch.log_softmax(torch.stack(steps).float(), -1)
            klds.append(torch.nn.functional.kl_div(incremental, full, log_target=True, reduction="none").sum(-1))
    independent = float(torch.cat(klds).mean())
    assert independent > 1e-4
    assert quantized_kv["kld_mean"] == pytest.approx(independent, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled-decode-step"])
def test_static_cache_scores_near_the_reference(load, reference, compile):
    from optimize.kvcache import KVCache

    m = measure_drift(load(KVCache(mode="static", compile=compile)), reference, SMALL)
    assert m["drift_through_cache"] is True
    through = m["drift_method"]["through_cache"]
    assert through["cache"]["class"] == "StaticCache"
    # the compiled step is scored through the loop it is timed in, the eager one through generate()
    assert through["path"].startswith("the variant's own decode loop") is compile
    # a compiled decode step would trace the probe hook, so the quantized count is not observed there
    assert through["quantized_positions_observed"] is (not compile)
    assert ("drift_kv_quantized_scored_tokens" in m) is (not compile)
    assert m["kld_mean"] < 1e-5 and m["top1_agreement"] >= 0.99


def test_auto_scoring_follows_the_recipe():
    def state(*reports, **generate_kwargs):
        return SimpleNamespace(reports=list(reports), generate_kwargs=generate_kwargs)

    assert resolve_scoring("auto", state())[0] == "full-window"
    assert resolve_scoring("auto", state({"technique": "cast", "dtype": "bfloat16"}))[0] == "full-window"
    quantized = state({"technique": "kv-cache", "mode": "quantized"}, cache_implementation="quantized")
    assert resolve_scoring("auto", quantized) == ("through-cache", "step 'kv-cache' changes the KV cache")
    off, reason = resolve_scoring("auto", state({"technique": "kv-cache", "mode": "none"}, use_cache=False))
    assert off == "full-window" and "recomputes its whole prefix" in reason
    assert resolve_scoring("through-cache", state())[0] == "through-cache"
    assert resolve_scoring("full-window", quantized)[0] == "full-window"


def test_scoring_setting_is_validated_where_the_matrix_is_read():
    from bench.matrix import parse_matrix

    with pytest.raises(InputError, match=r"\[drift\]: drift scoring must be one of 'auto', 'full-window', "
                                         r"'through-cache', got 'cache'"):
        parse_matrix({"models": ["synthetic:llama-tiny"], "variants": ["fp32"], "devices": ["cpu"],
                      "drift": {"scoring": "cache"}}, "m.toml")
    assert DriftConfig.from_dict({"scoring": "through-cache"}, "m.toml [drift]").scoring == "through-cache"
    assert "scoring" not in DriftConfig().reference_settings()  # one reference serves both paths


def test_batch_of_windows_is_bounded_by_the_logits_budget():
    assert batch_windows(32, 256, 8192) == 32  # 8 MiB of logits per window
    assert batch_windows(32, 256, 128_256) == 2
    assert batch_windows(3, 256, 8192) == 3
    assert batch_windows(32, 4096, 262_144) == 1
