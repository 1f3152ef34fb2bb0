"""The one place that owns clocks, warm-up, repetition and per-token timestamps.

CPU timing uses ``time.perf_counter_ns``. CUDA timing records CUDA events on the current
stream and reads them after one synchronisation, so stamping a token never stalls the
GPU. Token times come from a logits processor called once per generated token, right
after that step's forward pass: the first stamp is the time to first token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class CpuClock:
    name = "perf_counter_ns"

    def mark(self) -> int:
        return time.perf_counter_ns()

    def elapsed_ms(self, start: int, marks: list[int]) -> list[float]:
        return [(m - start) / 1e6 for m in marks]


class CudaClock:
    name = "cuda_event"

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, marks) -> list[float]:
        self._torch.cuda.synchronize()
        return [start.elapsed_time(m) for m in marks]


def clock_for(device: str):
    return CudaClock() if device == "cuda" else CpuClock()


class TokenStamper:
    """A ``transformers`` logits processor that stamps the clock at every generated token."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.marks: list[Any] = []

    def __call__(self, input_ids, scores):
        self.marks.append(self.clock.mark())
        return scores


# transformers' LogitsProcessorList reads each processor's signature at every token; one worked out
# here once is returned from then on, which halves what the stamper costs a token (about 15 -> 8 us on
# a 2.4 GHz EPYC core: a few percent of a CUDA-graph decode step).
TokenStamper.__call__.__signature__ = inspect.signature(TokenStamper.__call__)


@dataclass
class GenerateSample:
    """One timed generate call; times in milliseconds from the call's start."""

    token_ms: list[float]  # when each token's logits were ready; token_ms[0] is TTFT
    e2e_ms: float

    @property
    def ttft_ms(self) -> float:
        return self.token_ms[0]

    @property
    def tpot_ms(self) -> float:
        """(end-to-end - TTFT) / (tokens - 1), as vLLM and the field define it."""
        n = len(self.token_ms)
        return (self.e2e_ms - self.ttft_ms) / (n - 1) if n > 1 else float("nan")

    @property
    def itl_ms(self) -> list[float]:
        return [b - a for a, b in zip(self.token_ms, self.token_ms[1:], strict=False)]


def time_call(fn: Callable[[], Any], clock) -> float:
    """Run ``fn`` once; its duration in milliseconds (on CUDA, events around it read after one sync)."""
    start = clock.mark()
    fn()
    end = clock.mark()
    return clock.elapsed_ms(start, [end])[0]


def time_generate(generate: Callable[[TokenStamper], Any], clock) -> GenerateSample:
    """Run ``generate(stamper)`` once and read its per-token timestamps."""
    stamper = TokenStamper(clock)
    start = clock.mark()
    generate(stamper)
    end = clock.mark()
    times = clock.elapsed_ms(start, [*stamper.marks, end])
    assert len(times) >= 2, "the generate call produced no token"
    return GenerateSample(token_ms=times[:-1], e2e_ms=times[-1])


# The largest repetition count (and scenario count, bench.scenarios.base): 32-bit.
MAX_COUNT = 2**31 - 1
# What each repetition setting allows, as its error says it.
REPEAT_ALLOWED = {"warmup": "a whole number >= 0", "min_reps": "a whole number >= 1",
                  "max_reps": "a whole number >= 1", "budget_s": "a finite number of seconds >= 0",
                  "target_rel_ci": "a number >= 0 and < 1 (0: no early stop)"}


@dataclass(frozen=True)
class RepeatConfig:
    """Warm-up and repetition policy (llama-bench: 1 warm-up, 5 repetitions by default)."""

    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 20
    # Stop once min_reps are done and this much time has passed. Five repetitions of a 32-token
    # decode of the built-in model fit in 0.5 s: llama-bench's default count, and what
    # `infermatrix run` has always used.
    budget_s: float = 0.5
    # ... or earlier, once the 95% CI of the median end-to-end time is within +-this fraction of it
    # (0 turns it off); a cell that ends wider than this is marked noisy.
    target_rel_ci: float = 0.05

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise ``InputError`` for the first setting out of its range, naming it as ``names`` spells it (a
        flag, a matrix key; the field's own name by default), with the value given and what is allowed.
        """
        import math

        from optimize.errors import InputError

        def name(field: str) -> str:
            return (names or {}).get(field, field)

        def whole(value: Any, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def finite(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        ok = {"warmup": whole(self.warmup, 0), "min_reps": whole(self.min_reps, 1),
              "max_reps": whole(self.max_reps, 1), "budget_s": finite(self.budget_s) and self.budget_s >= 0,
              "target_rel_ci": finite(self.target_rel_ci) and 0 <= self.target_rel_ci < 1}
        for field_name, good in ok.items():
            if not good:
                raise InputError(f"{name(field_name)} must be {REPEAT_ALLOWED[field_name]}, "
                                 f"got {getattr(self, field_name)!r}")
        for field_name in ("warmup", "min_reps", "max_reps"):
            if getattr(self, field_name) > MAX_COUNT:  # run.json holds 64-bit integers; no run repeats 2**31 times
                raise InputError(f"{name(field_name)} must be at most {MAX_COUNT}, got {getattr(self, field_name)}")
        if self.min_reps > self.max_reps and "max_reps" in (names or {}) and "min_reps" not in names:
            raise InputError(f"{name('max_reps')} must be >= {name('min_reps')} ({self.min_reps}), "
                             f"got {self.max_reps}")  # the setting given is the one named wrong
        if self.min_reps > self.max_reps:
            raise InputError(f"{name('min_reps')} must be <= {name('max_reps')} ({self.max_reps}), "
                             f"got {self.min_reps}")


@dataclass
class Repeated:
    samples: list[Any] = field(default_factory=list)
    warmup_wall_s: list[float] = field(default_factory=list)
    measured_wall_s: float = 0.0


def rel_ci_half_width(values: list[float]) -> float:
    """Half the width of the 95% CI of the median, relative to the median."""
    import statistics

    from bench.stats import median_ci

    low, high, _ = median_ci(sorted(values))
    mid = statistics.median(values)
    return (high - low) / 2 / abs(mid) if mid else float("inf")


def _value(sample: Any) -> float | None:
    return sample.e2e_ms if isinstance(sample, GenerateSample) else None


def repeat(fn: Callable[[], Any], cfg: RepeatConfig) -> Repeated:
    """Warm up, then call ``fn`` until ``min_reps`` are done and the budget is spent or the CI is tight.

    Tight: the median end-to-end time's 95% CI within ``target_rel_ci`` of it. Never more
    than ``max_reps`` calls.
    """
    from bench import job_phase

    out = Repeated()
    for i in range(cfg.warmup):
        job_phase.enter("warming up", f"call {i + 1} of {cfg.warmup}")
        t0 = time.perf_counter()
        fn()
        out.warmup_wall_s.append(time.perf_counter() - t0)
    asked = f"min_reps {cfg.min_reps}, max_reps {cfg.max_reps}, budget_s {cfg.budget_s:g}"
    job_phase.enter("measuring", f"{_count(0)} done ({asked})")
    t_start = time.perf_counter()
    while len(out.samples) < cfg.max_reps:
        out.samples.append(fn())
        elapsed = time.perf_counter() - t_start
        job_phase.enter("measuring", f"{_count(len(out.samples))} done in {elapsed:.1f} s ({asked})")
        if len(out.samples) >= cfg.min_reps and (elapsed >= cfg.budget_s or _tight(out.samples, cfg)):
            break
    out.measured_wall_s = time.perf_counter() - t_start
    return out


def _count(n: int) -> str:
    return f"{n} repetition{'' if n == 1 else 's'}"


def _tight(samples: list[Any], cfg: RepeatConfig) -> bool:
    values = [_value(s) for s in samples]
    return cfg.target_rel_ci > 0 and None not in values and rel_ci_half_width(values) <= cfg.target_rel_ci
