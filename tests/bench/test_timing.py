"""The timing module with a scripted clock: TTFT, TPOT and ITL by hand, repetition policy by count."""

from __future__ import annotations

import math

import pytest

from bench.metrics import timing
from bench.metrics.timing import (
    CpuClock,
    GenerateSample,
    RepeatConfig,
    TokenStamper,
    clock_for,
    repeat,
    time_generate,
)
from optimize.errors import InputError


class ScriptedClock(CpuClock):
    """Marks come from a list of nanosecond readings; elapsed_ms is CpuClock's."""

    def __init__(self, readings_ns):
        self.readings = iter(readings_ns)

    def mark(self) -> int:
        return next(self.readings)


def test_generate_sample_ttft_tpot_itl_by_hand():
    s = GenerateSample(token_ms=[10.0, 13.0, 17.0, 22.0], e2e_ms=24.0)
    assert s.ttft_ms == 10.0
    assert s.tpot_ms == (24.0 - 10.0) / 3  # (e2e - TTFT) / (tokens - 1)
    assert s.itl_ms == [3.0, 4.0, 5.0]
    one = GenerateSample(token_ms=[7.0], e2e_ms=8.0)
    assert math.isnan(one.tpot_ms) and one.itl_ms == []


def test_time_generate_reads_one_stamp_per_token_from_the_call_start():
    # start at 1 ms; tokens at 5, 6, 8 ms; end at 9 ms (readings in ns)
    clock = ScriptedClock([1_000_000, 5_000_000, 6_000_000, 8_000_000, 9_000_000])

    def generate(stamper):
        for _ in range(3):
            assert stamper(None, "scores") == "scores"  # a logits processor hands the scores on unchanged

    sample = time_generate(generate, clock)
    assert sample.token_ms == [4.0, 5.0, 7.0] and sample.e2e_ms == 8.0
    assert sample.tpot_ms == 2.0


def test_time_generate_without_tokens_is_an_error():
    with pytest.raises(AssertionError, match="^the generate call produced no token$"):
        time_generate(lambda stamper: None, ScriptedClock([0, 1]))


def test_time_generate_of_a_single_token_is_its_ttft():
    sample = time_generate(lambda stamper: stamper(None, None), ScriptedClock([0, 2_000_000, 3_000_000]))
    assert sample.token_ms == [2.0] and sample.e2e_ms == 3.0 and math.isnan(sample.tpot_ms)


def test_cuda_clock_records_events_and_reads_them_after_one_synchronisation(monkeypatch):
    """CUDA emulated at the torch boundary: events are stamped with a counter, not a device."""
    import torch

    log = []

    class Event:
        count = 0

        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            Event.count += 1
            self.t = Event.count * 1.5

        def elapsed_time(self, end):
            log.append("elapsed")
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    clock = clock_for("cuda")
    start, marks = clock.mark(), [clock.mark(), clock.mark()]
    assert log == []  # stamping never synchronises
    assert clock.elapsed_ms(start, marks) == [1.5, 3.0]
    assert log == ["sync", "elapsed", "elapsed"]


def test_token_stamper_marks_each_call():
    stamper = TokenStamper(ScriptedClock([3, 4]))
    stamper(None, None)
    stamper(None, None)
    assert stamper.marks == [3, 4]


def test_token_stamper_is_called_by_transformers_with_its_precomputed_signature():
    """LogitsProcessorList inspects each processor's signature per token: the stamper's is ready-made."""
    import inspect

    import torch
    from transformers import LogitsProcessorList

    stamper = TokenStamper(ScriptedClock([7]))
    assert "__signature__" in vars(TokenStamper.__call__)  # returned as is, not worked out at every token
    assert list(inspect.signature(stamper.__call__).parameters) == ["input_ids", "scores"]
    scores = torch.zeros(1, 4)
    assert LogitsProcessorList([stamper])(torch.zeros(1, 2, dtype=torch.long), scores) is scores
    assert stamper.marks == [7]


def test_clocks():
    assert CpuClock().elapsed_ms(1_000_000, [1_500_000, 3_000_000]) == [0.5, 2.0]
    assert clock_for("cpu").name == "perf_counter_ns" and timing.CudaClock.name == "cuda_event"
    assert isinstance(clock_for("cuda"), timing.CudaClock)


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.calls


def test_repeat_warms_up_then_takes_min_reps_once_the_budget_is_spent():
    fn = Counter()
    out = repeat(fn, RepeatConfig(warmup=2, min_reps=3, max_reps=10, budget_s=0))
    assert fn.calls == 5 and out.samples == [3, 4, 5] and len(out.warmup_wall_s) == 2
    assert all(t >= 0 for t in out.warmup_wall_s) and out.measured_wall_s >= 0


def test_repeat_stops_at_max_reps_while_the_budget_lasts():
    fn = Counter()
    out = repeat(fn, RepeatConfig(warmup=0, min_reps=1, max_reps=4, budget_s=3600))
    assert out.samples == [1, 2, 3, 4] and out.warmup_wall_s == []


def test_repeat_continues_past_min_reps_until_the_budget_is_spent(monkeypatch):
    now = iter(range(100, 200))  # each perf_counter call advances 1 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(now)))
    out = repeat(Counter(), RepeatConfig(warmup=1, min_reps=2, max_reps=20, budget_s=5))
    # warm-up reads 100 and 101; t_start = 102; the check after sample k reads 102 + k:
    # stop at the first k >= 2 with k >= 5; the final reading is 108.
    assert out.warmup_wall_s == [1.0]
    assert out.samples == [2, 3, 4, 5, 6] and out.measured_wall_s == 6.0


@pytest.mark.parametrize(("fields", "message"), [
    ({"warmup": -1}, "warmup must be a whole number >= 0, got -1"),
    ({"min_reps": 0}, "min_reps must be a whole number >= 1, got 0"),
    ({"min_reps": 5, "max_reps": 4}, "min_reps must be <= max_reps (4), got 5"),
    ({"budget_s": -0.5}, "budget_s must be a finite number of seconds >= 0, got -0.5"),
    ({"budget_s": math.nan}, "budget_s must be a finite number of seconds >= 0, got nan"),
    ({"budget_s": math.inf}, "budget_s must be a finite number of seconds >= 0, got inf"),
    ({"target_rel_ci": -0.01}, "target_rel_ci must be a number >= 0 and < 1 (0: no early stop), got -0.01"),
    ({"target_rel_ci": 1.0}, "target_rel_ci must be a number >= 0 and < 1 (0: no early stop), got 1.0")])
def test_repeat_config_rejects_bad_settings(fields, message):
    with pytest.raises(InputError) as exc:
        RepeatConfig(**fields).validate()
    assert str(exc.value) == message
    RepeatConfig(warmup=0, min_reps=1, max_reps=1, budget_s=0).validate()
    RepeatConfig(target_rel_ci=0).validate()  # 0 turns the early stop off
    RepeatConfig(target_rel_ci=0.99).validate()


def test_time_call_reads_the_clock_around_the_call_only():
    calls = []
    clock = ScriptedClock([5_000_000, 12_500_000])
    assert timing.time_call(lambda: calls.append(1), clock) == pytest.approx(7.5)
    assert calls == [1]


def test_relative_ci_half_width_by_hand():
    # n = 9: the 95% CI of the median runs from the 2nd to the 8th order statistic (binomial
    # P(X <= 1) = 10/512 <= 0.025 < P(X <= 2) = 46/512), here 2 and 8; median 5: (8 - 2) / 2 / 5.
    assert timing.rel_ci_half_width([9, 1, 8, 2, 7, 3, 6, 4, 5]) == pytest.approx(0.6)
    assert timing.rel_ci_half_width([4.0] * 9) == 0.0
    assert timing.rel_ci_half_width([-1.0, 0.0, 1.0]) == math.inf  # a zero median has no relative width


def _samples(e2e_ms):
    return iter([GenerateSample(token_ms=[1.0, 2.0], e2e_ms=e) for e in e2e_ms])


def test_repeat_stops_early_once_the_median_ci_is_within_the_target():
    # Identical end-to-end times: the CI is tight at min_reps, long before the budget ends.
    samples = _samples([10.0] * 20)
    out = repeat(lambda: next(samples), RepeatConfig(warmup=0, min_reps=5, max_reps=20, budget_s=3600,
                                                     target_rel_ci=0.05))
    assert len(out.samples) == 5


def test_the_early_stop_compares_the_width_with_the_target_inclusively():
    # Five samples 9, 10, 10, 10, 11: the CI of the median (n = 5) is [min, max] = [9, 11], half
    # width 1 = 0.1 of the median 10: tight at a 0.1 target, not at 0.0999.
    for target, n in ((0.1, 5), (0.0999, 7)):
        samples = _samples([9.0, 10.0, 10.0, 10.0, 11.0, 10.0, 10.0])
        out = repeat(lambda s=samples: next(s), RepeatConfig(warmup=0, min_reps=5, max_reps=7, budget_s=3600,
                                                             target_rel_ci=target))
        assert len(out.samples) == n, target


def test_repeat_never_stops_early_with_the_target_off_or_without_end_to_end_times():
    samples = _samples([10.0] * 20)
    out = repeat(lambda: next(samples), RepeatConfig(warmup=0, min_reps=2, max_reps=6, budget_s=3600,
                                                     target_rel_ci=0))
    assert len(out.samples) == 6
    fn = Counter()  # plain numbers are not generate samples: no end-to-end time to judge
    assert len(repeat(fn, RepeatConfig(warmup=0, min_reps=2, max_reps=6, budget_s=3600)).samples) == 6
