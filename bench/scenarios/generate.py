"""The generate scenario: batch x prompt x new tokens, greedy, every token generated."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

from bench.generation import decode_loop, generate_kwargs, greedy_generate  # noqa: F401 (re-exported)
from bench.metrics.timing import GenerateSample, RepeatConfig, clock_for, repeat, time_generate
from bench.scenarios.base import Footprint, Scenario, check_count
from bench.stats import summarize
from optimize.errors import InputError, clip


@dataclass(frozen=True)
class GenerateScenario(Scenario):
    """One generate workload."""

    batch_size: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 32
    name: ClassVar[str] = "generate"

    def validate(self) -> None:
        for key in ("batch_size", "prompt_tokens", "new_tokens"):
            check_count("scenario", key, getattr(self, key))
        if self.new_tokens < 2:
            raise InputError(f"new_tokens must be >= 2 so decode can be timed, got {self.new_tokens}")


    def run(self, state, prompts, repeat_cfg: RepeatConfig,
            footprint: Footprint | None = None) -> tuple[dict, dict, dict]:
        """Time the workload on a loaded variant.

        Returns:
            (metrics, samples, method): summaries, raw per-repetition values, and how they were taken.

        """
        return _run_generate(state, self, prompts, repeat_cfg)


def _run_generate(state, scenario: GenerateScenario, prompts, repeat_cfg: RepeatConfig) -> tuple[dict, dict, dict]:
    clock = clock_for(state.device)

    def once() -> GenerateSample:
        return time_generate(lambda stamper: greedy_generate(state, prompts, scenario.new_tokens, [stamper]), clock)

    skipped = GraphSkips()
    # inductor counts a CPU graph's skip without logging it: its reason is known
    unlogged = "(reason not logged)" if state.device == "cuda" else "the compiled graph runs on the CPU"
    watch = _cudagraph_skips(skipped, unlogged) if _uses_cuda_graphs(state) else nullcontext()
    with watch:
        compile_call = _compile_call(state, once)
        result = repeat(once, repeat_cfg)
    runs: list[GenerateSample] = result.samples
    b, p, n = scenario.batch_size, scenario.prompt_tokens, scenario.new_tokens
    prefill_rates = [b * p / (s.ttft_ms / 1e3) for s in runs]
    decode_rates = [b * (n - 1) / ((s.e2e_ms - s.ttft_ms) / 1e3) for s in runs]
    samples = {
        "ttft_ms": [s.ttft_ms for s in runs],
        "tpot_ms": [s.tpot_ms for s in runs],
        "e2e_ms": [s.e2e_ms for s in runs],
        "itl_ms": [s.itl_ms for s in runs],
        "prefill_tokens_per_s": prefill_rates,
        "decode_tokens_per_s": decode_rates,
        "warmup_wall_s": result.warmup_wall_s,
    }
    metrics = {
        "ttft_ms": summarize(samples["ttft_ms"]),
        "tpot_ms": summarize(samples["tpot_ms"]),
        "e2e_ms": summarize(samples["e2e_ms"]),
        "itl_ms": summarize([x for rep in samples["itl_ms"] for x in rep]),
        "prefill_tokens_per_s": summarize(prefill_rates)["p50"],
        "decode_tokens_per_s": summarize(decode_rates)["p50"],
        "decode_tokens_per_s_summary": summarize(decode_rates),
        "measured_wall_s": result.measured_wall_s,
    }
    method = {"clock": clock.name, "repeat": repeat_cfg.__dict__,
              "decode_loop": decode_loop(state),
              "token_timestamps": "logits processor, once per generated token",
              "tpot": "(e2e - ttft) / (new_tokens - 1)", "rates": "median over repetitions"}
    if compile_call is not None:
        # What the compiling call took beyond a steady-state call: compilation and CUDA-graph capture.
        steady_s = metrics["e2e_ms"]["p50"] / 1e3
        method["compiled_decode_step"] = {
            "compile_call_wall_s": compile_call, "compile_and_capture_s": max(compile_call - steady_s, 0.0),
            "how": "one generate call before warm-up compiles (and on CUDA graph-captures) the decode step; "
                   "compile_and_capture_s = its wall time - the median measured e2e"}
        if _uses_cuda_graphs(state):
            # inductor falls back to plain kernel launches where it cannot graph a step, and only logs why
            method["compiled_decode_step"]["cudagraph_skips"] = skipped.count
            if skipped.count:
                state.labels.append(f"CUDA graphs not used ({skipped.count} compiled graph(s) skipped by inductor: "
                                    f"{clip(skipped.reasons[0], 200)})")
    return metrics, samples, method


CUDAGRAPH_LOG = "torch._inductor.cudagraph_utils.__cudagraphs"  # inductor's "cudagraphs" log artifact


def _uses_cuda_graphs(state) -> bool:
    """Whether the variant's compiled decode step asks for CUDA graphs (``reduce-overhead``, ``max-autotune``)."""
    config = compiled_step_config(state)
    return config is not None and getattr(config, "mode", None) in ("reduce-overhead", "max-autotune")


def compiled_step_config(state):
    """The compile settings of the variant's compiled decode step (its decode loop's), or None."""
    decoder = getattr(state, "decoder", None)
    return getattr(decoder, "compile_config", None)


@dataclass
class GraphSkips:
    """How many compiled graphs inductor ran without CUDA graphs, and the reasons it logged."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)


class _Messages(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _cudagraph_skips(into: GraphSkips, unlogged: str):
    """Count, into ``into``, the compiled graphs inductor ran without CUDA graphs while the block ran, and why.

    The count is ``counters["inductor"]["cudagraph_skips"]``'s increase (the logger also carries
    warnings that skip nothing). A graph with CUDA tensors logs its reason on the ``cudagraphs``
    artifact logger (at warning level, on by default), a CPU-only one does not: ``unlogged`` is
    then the reason.
    """
    from torch._dynamo.utils import counters

    before = counters["inductor"]["cudagraph_skips"]
    logger, handler = logging.getLogger(CUDAGRAPH_LOG), _Messages(into.reasons)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        into.count = counters["inductor"]["cudagraph_skips"] - before
        if into.count and not into.reasons:
            into.reasons.append(unlogged)


def _compile_call(state, once) -> float | None:
    """Run the call that compiles a compiled decode step, apart from warm-up and repetitions; its wall time."""
    if compiled_step_config(state) is None:
        return None
    from bench import job_phase

    job_phase.enter("compiling the decode step", "the first call compiles it (and captures CUDA graphs)")
    t0 = time.perf_counter()
    once()
    return time.perf_counter() - t0
