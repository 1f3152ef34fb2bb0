"""Scenario runs on a loaded variant: generate, prefill and decode sweeps."""

from __future__ import annotations

import pytest

from bench.metrics.timing import RepeatConfig
from bench.scenarios import DecodeScenario, Footprint, GenerateScenario, PrefillScenario
from optimize.errors import NotApplicable
from optimize.recipe import Recipe
from optimize.store import VariantStore, load_variant

REPEAT = RepeatConfig(warmup=1, min_reps=3, max_reps=3, budget_s=0)


@pytest.fixture(scope="module")
def fp32(tiny_ref, cache_dir):
    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    return state


def test_generate_records_one_timestamp_per_token_and_consistent_rates(fp32, tiny_prompts):
    scenario = GenerateScenario(batch_size=2, prompt_tokens=16, new_tokens=6)
    metrics, samples, _ = scenario.run(fp32, tiny_prompts, REPEAT)
    assert metrics["ttft_ms"]["n"] == 3 and all(len(itl) == 5 for itl in samples["itl_ms"])
    for ttft, e2e, tpot, rate in zip(samples["ttft_ms"], samples["e2e_ms"], samples["tpot_ms"],
                                     samples["decode_tokens_per_s"], strict=True):
        assert 0 < ttft < e2e
        assert tpot == pytest.approx((e2e - ttft) / 5)
        assert rate == pytest.approx(2 * 5 / ((e2e - ttft) / 1e3))


def test_prefill_scenario_times_the_prompt_pass(fp32, tiny_prompts):
    metrics, samples, method = PrefillScenario(batch_size=2, prompt_tokens=16).run(fp32, tiny_prompts, REPEAT)
    assert metrics["ttft_ms"]["n"] == 3 and "decode_tokens_per_s" not in metrics
    assert metrics["prefill_tokens_per_s"] == pytest.approx(sorted(samples["prefill_tokens_per_s"])[1])
    assert metrics["ttft_ms"]["p50"] == pytest.approx(sorted(samples["ttft_ms"])[1])


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_rate_counts_every_prompt_token_of_the_batch(fp32, tiny_prompts, batch):
    prompts = tiny_prompts[:batch]  # (batch, 16)
    _, samples, _ = PrefillScenario(batch_size=batch, prompt_tokens=16).run(fp32, prompts, REPEAT)
    tokens = prompts.numel()  # batch x 16 prompt tokens processed per call
    assert tokens == batch * 16
    for ttft, rate in zip(samples["ttft_ms"], samples["prefill_tokens_per_s"], strict=True):
        assert rate == pytest.approx(tokens / (ttft / 1e3))


# Decode memory estimate by hand for the tiny model (vocab 8192), prompt 16, 4 new tokens, 10 MB of
# weights, 1 KiB of KV cache per token: per sequence 20 x 1024 KV + 1 x 8192 x 4 logits (generate()
# keeps the last prompt position's alone).
PER_SEQUENCE = 20 * 1024 + 1 * 8192 * 4
FOOTPRINT = Footprint(weights_bytes=10**7, kv_bytes_per_token=1024)


def test_decode_sweep_skips_a_batch_past_the_memory_limit(fp32, tiny_prompts, monkeypatch):
    import bench.scenarios.sweeps as sweeps

    # The host's free memory is emulated so the outcome is the same on any machine: 80% of
    # 12,670,000 bytes = 10,136,000 holds batch 2 (10,106,496) but not batch 3 (10,159,744).
    monkeypatch.setattr(sweeps, "available_bytes", lambda device: 12_670_000)
    with pytest.raises(NotApplicable, match=r"batch 3: estimated 0\.01 GiB exceeds the decode memory limit "
                                            r"0\.01 GiB \(80% of available\)"):
        DecodeScenario(batch_size=3, prompt_tokens=16, new_tokens=4).run(fp32, tiny_prompts, REPEAT, FOOTPRINT)
    metrics, _, method = DecodeScenario(batch_size=2, prompt_tokens=16, new_tokens=4).run(fp32, tiny_prompts, REPEAT,
                                                                                          FOOTPRINT)
    assert metrics["decode_memory_estimate_bytes"] == 10**7 + 2 * PER_SEQUENCE == 10_106_496
    assert method["decode_memory_limit_bytes"] == 10_136_000
    assert metrics["decode_tokens_per_s"] > 0


def test_decode_estimate_counts_the_logits_the_prompt_pass_computes():
    """A transformers model keeps the last prompt position's logits; an ONNX graph computes every position's."""
    from types import SimpleNamespace

    from bench.scenarios.sweeps import estimated_decode_bytes

    scenario = DecodeScenario(batch_size=4, prompt_tokens=16, new_tokens=4)
    config = SimpleNamespace(vocab_size=8192)
    torch_state = SimpleNamespace(backend="torch", model=SimpleNamespace(config=config,
                                                                         _supports_logits_to_keep=lambda: True))
    assert estimated_decode_bytes(torch_state, scenario, 10**7, 1024) == 10**7 + 4 * 20 * 1024 + 4 * 1 * 8192 * 4
    old_forward = SimpleNamespace(backend="torch", model=SimpleNamespace(config=config,
                                                                         _supports_logits_to_keep=lambda: False))
    onnx_state = SimpleNamespace(backend="onnxruntime", model=SimpleNamespace(config=config,
                                                                             _supports_logits_to_keep=lambda: True))
    for state in (old_forward, onnx_state):
        assert estimated_decode_bytes(state, scenario, 10**7, 1024) == 10**7 + 4 * 20 * 1024 + 4 * 16 * 8192 * 4


def test_decode_memory_limit_follows_memory_percent(fp32, tiny_prompts, monkeypatch):
    import bench.scenarios.sweeps as sweeps

    monkeypatch.setattr(sweeps, "available_bytes", lambda device: 14_000_000)
    with pytest.raises(NotApplicable, match=r"\(70% of available\)"):  # 9,800,000 < 10,053,248
        DecodeScenario(batch_size=1, prompt_tokens=16, new_tokens=4, memory_percent=70).run(
            fp32, tiny_prompts, REPEAT, FOOTPRINT)


def test_available_bytes_on_cpu_is_what_psutil_reports_as_available(monkeypatch):
    import psutil

    import bench.scenarios.sweeps as sweeps

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 123_456_789})())
    assert sweeps.available_bytes("cpu") == 123_456_789
