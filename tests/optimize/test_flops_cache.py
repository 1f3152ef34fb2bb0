"""Prefill FLOPs are counted once per config and shape, then read from the cache by later cells."""

from __future__ import annotations

import json

from transformers import LlamaConfig

from optimize import introspect


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def count(config, batch: int, prompt: int, cache_dir) -> int:
    return introspect.prefill_flops(config, batch, prompt, cache_dir, last_logits_only=True)


def test_count_is_stored_and_reused_and_a_damaged_entry_is_counted_again(tmp_path):
    config = _config()
    introspect._prefill_flops.cache_clear()
    counted = count(config, 2, 16, tmp_path)
    [entry] = (tmp_path / "flops").glob("*.json")
    assert json.loads(entry.read_text()) == {"prefill_flops": counted, "batch": 2, "prompt": 16,
                                             "last_logits_only": True}
    entry.write_text(json.dumps({"prefill_flops": 12345, "batch": 2, "prompt": 16}))
    assert count(config, 2, 16, tmp_path) == 12345  # read from disk, not counted again
    entry.write_text("{torn")
    introspect._prefill_flops.cache_clear()
    assert count(config, 2, 16, tmp_path) == counted
    assert json.loads(entry.read_text())["prefill_flops"] == counted  # the damaged entry was rewritten
    assert count(config, 4, 16, tmp_path) > counted  # another shape, its own entry
    assert len(list((tmp_path / "flops").glob("*.json"))) == 2
    every = introspect.prefill_flops(config, 2, 16, tmp_path, last_logits_only=False)  # its own entry too
    assert every > counted and len(list((tmp_path / "flops").glob("*.json"))) == 3
