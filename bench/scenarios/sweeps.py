"""The prefill and decode sweep scenarios.

``prefill`` times the prompt pass alone (a one-token generate call: its time to first
token) across prompt lengths; ``decode`` times token generation across batch sizes, up to
a memory limit: a batch whose estimated footprint exceeds the limit is skipped with the
estimate, not attempted.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.metrics.timing import GenerateSample, RepeatConfig, clock_for, repeat, time_generate
from bench.scenarios.generate import GenerateScenario, greedy_generate, run_generate
from bench.stats import summarize
from optimize.errors import InputError, NotApplicable


@dataclass(frozen=True)
class PrefillScenario:
    """Prompt processing only: TTFT and prefill tokens/s per prompt length."""

    batch_size: int = 1
    prompt_tokens: int = 128
    name: str = "prefill"

    @property
    def new_tokens(self) -> int:
        return 1

    def validate(self) -> None:
        for key in ("batch_size", "prompt_tokens"):
            if getattr(self, key) < 1:
                raise InputError(f"prefill {key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class DecodeScenario(GenerateScenario):
    """Token generation throughput versus batch size, skipped past ``memory_percent`` of free memory."""

    memory_percent: int = 80  # of the memory available when the cell starts
    name: str = "decode"


def run_prefill(state, scenario: PrefillScenario, prompts, repeat_cfg: RepeatConfig) -> tuple[dict, dict, dict]:
    clock = clock_for(state.device)

    def once() -> GenerateSample:
        return time_generate(lambda stamper: greedy_generate(state, prompts, 1, [stamper]), clock)

    result = repeat(once, repeat_cfg)
    ttft = [s.ttft_ms for s in result.samples]
    rates = [scenario.batch_size * scenario.prompt_tokens / (t / 1e3) for t in ttft]
    metrics = {"ttft_ms": summarize(ttft), "prefill_tokens_per_s": summarize(rates)["p50"],
               "prefill_tokens_per_s_summary": summarize(rates), "measured_wall_s": result.measured_wall_s}
    samples = {"ttft_ms": ttft, "prefill_tokens_per_s": rates, "warmup_wall_s": result.warmup_wall_s}
    method = {"clock": clock.name, "repeat": repeat_cfg.__dict__,
              "prefill": "one-token greedy generate; the first token's logits mark the end of prefill"}
    return metrics, samples, method


def estimated_decode_bytes(state, scenario: DecodeScenario, weights_bytes: int, kv_bytes_per_token: float) -> float:
    """Weights + KV cache at the final length + the prompt's logits (batch x prompt x vocab x 4)."""
    b, p, n = scenario.batch_size, scenario.prompt_tokens, scenario.new_tokens
    vocab = state.model.config.vocab_size
    return weights_bytes + b * (p + n) * kv_bytes_per_token + b * p * vocab * 4


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def run_decode(state, scenario: DecodeScenario, prompts, repeat_cfg: RepeatConfig, weights_bytes: int,
               kv_bytes_per_token: float) -> tuple[dict, dict, dict]:
    need = estimated_decode_bytes(state, scenario, weights_bytes, kv_bytes_per_token)
    limit = available_bytes(state.device) * scenario.memory_percent / 100
    if need > limit:
        raise NotApplicable(f"batch {scenario.batch_size}: estimated {need / 2**30:.2f} GiB exceeds the decode "
                            f"memory limit {limit / 2**30:.2f} GiB ({scenario.memory_percent}% of available)")
    metrics, samples, method = run_generate(state, scenario, prompts, repeat_cfg)
    metrics["decode_memory_estimate_bytes"] = need
    method["decode_memory_limit_bytes"] = limit
    return metrics, samples, method
