"""The prefill and decode sweep scenarios.

``prefill`` times the prompt pass alone (a one-token generate call: its time to first
token) across prompt lengths; ``decode`` times token generation across batch sizes, up to
a memory limit: a batch whose estimated footprint exceeds the limit is skipped with the
estimate, not attempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.generation import decode_loop, last_logits_only
from bench.metrics.timing import GenerateSample, RepeatConfig, clock_for, repeat, time_generate
from bench.scenarios.base import Footprint, Scenario, check_count
from bench.scenarios.generate import GenerateScenario, greedy_generate
from bench.stats import summarize
from optimize.errors import InputError, NotApplicable


@dataclass(frozen=True)
class PrefillScenario(Scenario):
    """Prompt processing only: TTFT and prefill tokens/s per prompt length."""

    batch_size: int = 1
    prompt_tokens: int = 128
    name: ClassVar[str] = "prefill"
    # One generated token: its logits mark the end of the prompt pass. Recorded with the cell.
    new_tokens: ClassVar[int] = 1
    FIXED: ClassVar[tuple[str, ...]] = ("new_tokens",)

    def validate(self) -> None:
        for key in ("batch_size", "prompt_tokens"):
            check_count("prefill", key, getattr(self, key))

    def run(self, state, prompts, repeat_cfg: RepeatConfig,
            footprint: Footprint | None = None) -> tuple[dict, dict, dict]:
        return _run_prefill(state, self, prompts, repeat_cfg)


@dataclass(frozen=True)
class DecodeScenario(GenerateScenario):
    """Token generation throughput versus batch size, skipped past ``memory_percent`` of free memory."""

    memory_percent: int = 80  # of the memory available when the cell starts, 1..100
    name: ClassVar[str] = "decode"

    def validate(self) -> None:
        super().validate()
        # a share of the memory free when the cell starts: past 100 the limit is memory that is not there
        if not 1 <= self.memory_percent <= 100:
            raise InputError(f"decode memory_percent must be in 1..100 (percent of the memory available when "
                             f"the cell starts), got {self.memory_percent}")

    def run(self, state, prompts, repeat_cfg: RepeatConfig,
            footprint: Footprint | None = None) -> tuple[dict, dict, dict]:
        if footprint is None:
            raise TypeError("the decode scenario needs the variant's footprint (weights and KV bytes per token)")
        return _run_decode(state, self, prompts, repeat_cfg, footprint)


def _run_prefill(state, scenario: PrefillScenario, prompts, repeat_cfg: RepeatConfig) -> tuple[dict, dict, dict]:
    clock = clock_for(state.device)

    def once() -> GenerateSample:
        return time_generate(lambda stamper: greedy_generate(state, prompts, scenario.new_tokens, [stamper]), clock)

    result = repeat(once, repeat_cfg)
    ttft = [s.ttft_ms for s in result.samples]
    rates = [scenario.batch_size * scenario.prompt_tokens / (t / 1e3) for t in ttft]
    metrics = {"ttft_ms": summarize(ttft), "prefill_tokens_per_s": summarize(rates)["p50"],
               "prefill_tokens_per_s_summary": summarize(rates), "measured_wall_s": result.measured_wall_s}
    samples = {"ttft_ms": ttft, "prefill_tokens_per_s": rates, "warmup_wall_s": result.warmup_wall_s}
    method = {"clock": clock.name, "repeat": repeat_cfg.__dict__, "decode_loop": decode_loop(state),
              "prefill": "one-token greedy generate; the first token's logits mark the end of prefill"}
    return metrics, samples, method


def estimated_decode_bytes(state, scenario: DecodeScenario, weights_bytes: int, kv_bytes_per_token: float) -> float:
    """Weights + KV cache at the final length + the prompt pass's fp32 logits (batch x positions x vocab x 4).

    Positions: 1 where ``generate()`` keeps the last position's logits alone (transformers
    models), the whole prompt for a graph that computes them all (ONNX): counting every
    position for a transformers model would skip batches that fit (64 x 512 prompt tokens of a
    128k vocabulary are 16.8 GB of logits it never holds).
    """
    b, p, n = scenario.batch_size, scenario.prompt_tokens, scenario.new_tokens
    vocab = state.model.config.vocab_size
    positions = 1 if last_logits_only(state) else p
    return weights_bytes + b * (p + n) * kv_bytes_per_token + b * positions * vocab * 4


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _run_decode(state, scenario: DecodeScenario, prompts, repeat_cfg: RepeatConfig,
                footprint: Footprint) -> tuple[dict, dict, dict]:
    need = estimated_decode_bytes(state, scenario, footprint.weights_bytes, footprint.kv_bytes_per_token)
    limit = available_bytes(state.device) * scenario.memory_percent / 100
    if need > limit:
        raise NotApplicable(f"batch {scenario.batch_size}: estimated {need / 2**30:.2f} GiB exceeds the decode "
                            f"memory limit {limit / 2**30:.2f} GiB ({scenario.memory_percent}% of available)")
    metrics, samples, method = GenerateScenario.run(scenario, state, prompts, repeat_cfg)
    metrics["decode_memory_estimate_bytes"] = need
    method["decode_memory_limit_bytes"] = limit
    return metrics, samples, method
