"""Greedy generation leaves the variant's own settings as they were."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.generation import greedy_generate


class _RewritingModel:
    """Stands in for transformers' generate(), which rewrites a quantized cache_config in place."""

    config = SimpleNamespace(pad_token_id=0, eos_token_id=0)

    def generate(self, input_ids, attention_mask, logits_processor, max_new_tokens, cache_config, **kwargs):
        cache_config.pop("backend")
        cache_config["config"] = object()
        return torch.cat([input_ids, torch.zeros(input_ids.shape[0], max_new_tokens, dtype=input_ids.dtype)], 1)


def test_generate_call_cannot_rewrite_the_variants_cache_settings():
    settings = {"cache_implementation": "quantized", "cache_config": {"backend": "quanto", "nbits": 4}}
    state = SimpleNamespace(model=_RewritingModel(), device="cpu", generate_kwargs=settings, decoder=None)
    for _ in range(2):  # the second call sees the settings the variant was built with
        out = greedy_generate(state, torch.ones(2, 3, dtype=torch.long), 4)
        assert out.shape == (2, 7)
    assert state.generate_kwargs == {"cache_implementation": "quantized",
                                     "cache_config": {"backend": "quanto", "nbits": 4}}
