"""Scenario runs on a loaded variant: generate, prefill and decode sweeps."""

from __future__ import annotations

import pytest

from bench.metrics.timing import RepeatConfig
from bench.scenarios.generate import GenerateScenario, run_generate
from bench.scenarios.sweeps import DecodeScenario, PrefillScenario, run_decode, run_prefill
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
    metrics, samples, _ = run_generate(fp32, scenario, tiny_prompts, REPEAT)
    assert metrics["ttft_ms"]["n"] == 3 and all(len(itl) == 5 for itl in samples["itl_ms"])
    for ttft, e2e, tpot, rate in zip(samples["ttft_ms"], samples["e2e_ms"], samples["tpot_ms"],
                                     samples["decode_tokens_per_s"], strict=True):
        assert 0 < ttft < e2e
        assert tpot == pytest.approx((e2e - ttft) / 5)
        assert rate == pytest.approx(2 * 5 / ((e2e - ttft) / 1e3))


def test_prefill_scenario_times_the_prompt_pass(fp32, tiny_prompts):
    metrics, samples, method = run_prefill(fp32, PrefillScenario(batch_size=2, prompt_tokens=16), tiny_prompts, REPEAT)
    assert metrics["ttft_ms"]["n"] == 3 and "decode_tokens_per_s" not in metrics
    assert metrics["prefill_tokens_per_s"] == pytest.approx(sorted(samples["prefill_tokens_per_s"])[1])


def test_decode_sweep_skips_a_batch_past_the_memory_limit(fp32, tiny_prompts):
    with pytest.raises(NotApplicable, match="exceeds the decode memory limit"):
        run_decode(fp32, DecodeScenario(batch_size=100_000, prompt_tokens=16, new_tokens=4), tiny_prompts, REPEAT,
                   weights_bytes=10**7, kv_bytes_per_token=1024)
    metrics, _, _ = run_decode(fp32, DecodeScenario(batch_size=2, prompt_tokens=16, new_tokens=4), tiny_prompts,
                               REPEAT, weights_bytes=10**7, kv_bytes_per_token=1024)
    assert metrics["decode_tokens_per_s"] > 0 and metrics["decode_memory_estimate_bytes"] > 10**7
