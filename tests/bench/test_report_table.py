"""The comparison table's building blocks: figures and their marks, drift texts, sweeps, the speedup bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from bench.metrics.drift_config import DEFAULT_PROTOCOL
from bench.report.table import NOISY_REL_CI, Figure, Row, drift_protocol_name, gpus_text, speedup_interval, sweeps
from tests.bench.records import record


def test_a_figure_prints_its_value_interval_and_noise_mark():
    steady = Figure("tpot_ms", 10.0, (9.9, 10.1), 5)
    assert steady.text() == "10.00 [9.90, 10.10]" and steady.text(with_ci=False) == "10.00"
    assert not steady.noisy and steady.rel_ci_width == pytest.approx(0.02)
    noisy = Figure("tpot_ms", 10.0, (9.0, 11.5), 5)
    assert noisy.noisy and noisy.text() == "10.00 [9.00, 11.50] ~" and noisy.text(with_ci=False) == "10.00 ~"
    # The mark is for a width beyond the limit, not at it.
    assert not Figure("tpot_ms", 10.0, (10.0, 10.0 + 10 * NOISY_REL_CI), 5).noisy
    assert Figure("tpot_ms", 10.0, (10.0, 10.0 + 10 * NOISY_REL_CI * 1.01), 5).noisy
    # A latency is "lower is better" but its interval width counts either way round the value.
    assert Figure("tpot_ms", -10.0, (-11.5, -9.0)).rel_ci_width == pytest.approx(0.25)


@pytest.mark.parametrize(("figure", "text"), [(Figure("tpot_ms", None, (1.0, 2.0)), "-"),
                                              (Figure("tpot_ms", 0.0, (-1.0, 1.0)), "0.00 [-1.00, 1.00]"),
                                              (Figure("tpot_ms", 10.0, None), "10.00")])
def test_a_figure_without_a_value_or_an_interval_has_no_width_and_no_mark(figure, text):
    assert figure.rel_ci_width is None and not figure.noisy and figure.text() == text


def test_a_drift_figure_is_never_marked_noisy_and_prints_no_interval():
    kld = Figure("kld_mean", 0.01, (0.001, 0.05), 4096)  # a standard error over tokens, not run noise
    assert kld.rel_ci_width == pytest.approx(4.9) and not kld.noisy
    assert kld.text() == kld.text(with_ci=False) and "[" not in kld.text() and "~" not in kld.text()


@pytest.mark.parametrize(("fields", "text"), [
    ({}, "-"),  # no drift measured
    ({"drift_ok": True, "drift_violations": []}, "ok"),
    ({"drift_ok": False, "drift_violations": ["kld_mean 0.2 > 0.1"]}, "over budget"),
    ({"drift_ok": False, "drift_violations": []}, "drift failed"),
    ({"drift_ok": False}, "drift failed"),
])
def test_the_drift_column_says_whether_the_budget_held(fields, text):
    assert Row({"variant": "v", "status": "ok", **fields}, {}).drift_text() == text


@pytest.mark.parametrize(("method", "name"), [
    (None, None),
    ({}, None),
    ({"drift": None}, None),
    ({"drift": {"protocol": None}}, None),  # no drift measured
    ({"drift": {"protocol": {"first": "half"}, "protocol_name": "llama-perplexity"}}, "llama-perplexity"),
    ({"drift": {"protocol": {"first": 1}}}, DEFAULT_PROTOCOL),  # written before the protocol could be chosen
])
def test_the_drift_protocol_is_named_only_where_drift_was_scored(method, name):
    assert drift_protocol_name({"method": method} if method is not None else {}) == name


def _at(variant: str, batch: int, prompt: int, status: str = "ok") -> dict:
    return record(variant, status=status, scenario={"name": "generate", "batch_size": batch,
                                                    "prompt_tokens": prompt, "new_tokens": 32})


def test_sweeps_are_series_over_one_axis_with_two_or_more_points_in_order():
    recs = [_at("a", 4, 128), _at("a", 1, 128), _at("a", 2, 128), _at("a", 8, 128, status="failed"),
            _at("b", 1, 128), _at("b", 1, 512), _at("c", 1, 64), _at("c", 1, 64)]
    out = sweeps(recs)
    assert set(out) == {"batch_size", "prompt_tokens"}
    by_batch = {key: [x for x, _ in points] for key, points in out["batch_size"].items()}
    assert by_batch == {("tiny", "cpu", "generate", "a", 128, 32): [1, 2, 4]}  # the failed batch 8 left out
    assert all(r["variant"] == "a" and r["scenario"]["batch_size"] == x for x, r in
               out["batch_size"][("tiny", "cpu", "generate", "a", 128, 32)])
    by_prompt = {key: [x for x, _ in points] for key, points in out["prompt_tokens"].items()}
    # b is swept over prompts; c measured one prompt length twice: no series.
    assert by_prompt == {("tiny", "cpu", "generate", "b", 1, 32): [128, 512]}
    # A point measured twice (two rounds) stays in the series, in the order measured.
    twice = [_at("a", 2, 128), _at("a", 1, 128), _at("a", 1, 128)]
    twice[2]["timing_s"] = {"measure": 1.5}  # the second round's record differs from the first
    (points,) = sweeps(twice)["batch_size"].values()
    assert [x for x, _ in points] == [1, 1, 2] and points[0][1] is twice[1] and points[1][1] is twice[2]


def _percentile_bootstrap(ref: np.ndarray, var: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of median(ref) / median(var), each side resampled on its own."""
    rng = np.random.default_rng(seed)
    a = np.median(rng.choice(ref, (n, len(ref))), axis=1)
    b = np.median(rng.choice(var, (n, len(var))), axis=1)
    low, high = np.percentile(a / b, [2.5, 97.5])
    return float(low), float(high)


def test_the_speedup_interval_is_an_unpaired_95_percent_percentile_bootstrap():
    rng = np.random.default_rng(1)
    # Both sides in ascending order, as a slowly warming machine can leave them.
    ref = np.sort(100 * np.exp(rng.normal(0, 0.05, 15)))
    var = np.sort(50 * np.exp(rng.normal(0, 0.05, 15)))
    low, high = speedup_interval(list(ref), list(var), {"a": 1}, {"b": 2}, "e2e_ms")
    want_low, want_high = _percentile_bootstrap(ref, var, 40_000, 7)
    assert low == pytest.approx(want_low, rel=0.01) and high == pytest.approx(want_high, rel=0.01)
    # Paired resampling (one index for both sides) would tie the sides' orders together and narrow the interval:
    # the two processes' repetitions are independent.
    paired = np.random.default_rng(3).integers(0, 15, (40_000, 15))
    p_low, p_high = np.percentile(np.median(ref[paired], 1) / np.median(var[paired], 1), [2.5, 97.5])
    assert high - low > 1.2 * (p_high - p_low)


def test_the_speedup_interval_is_reproducible():
    rng = np.random.default_rng(4)
    ref, var = list(100 * np.exp(rng.normal(0, 0.05, 40))), list(50 * np.exp(rng.normal(0, 0.05, 40)))
    assert speedup_interval(ref, var, {}, {"b": 1}, "e2e_ms") == speedup_interval(ref, var, {}, {"b": 1}, "e2e_ms")


def test_an_interval_end_under_one_still_divides():
    ref, var = record("fp32", steps=0), record("v")
    ref["metrics"]["e2e_ms"]["ci95_p50"], var["metrics"]["e2e_ms"]["ci95_p50"] = [0.9, 1.1], [0.4, 0.6]
    assert speedup_interval(None, None, ref, var, "e2e_ms") == pytest.approx((0.9 / 0.6, 1.1 / 0.4))


def test_three_samples_a_side_are_enough_for_the_bootstrap():
    ref, var = record("fp32", steps=0), record("v")
    ref["metrics"]["e2e_ms"]["ci95_p50"], var["metrics"]["e2e_ms"]["ci95_p50"] = [90.0, 110.0], [40.0, 60.0]
    low, high = speedup_interval([99.0, 100.0, 101.0], [49.0, 50.0, 51.0], ref, var, "e2e_ms")
    assert 99 / 51 <= low < high <= 101 / 49  # from the samples, not the interval ends (1.5, 2.75)


@pytest.mark.parametrize(("env", "text"), [
    ({"gpus": [{"name": "NVIDIA H200"}, {"name": "NVIDIA H100"}]}, "NVIDIA H200, NVIDIA H100"),
    ({"gpus": [{"uuid": "GPU-1"}], "gpus_source": "nvml"}, "?"),  # a device NVML could not name
    ({}, "none"),  # an environment recorded without the GPU list
])
def test_the_gpu_line_names_every_device(env, text):
    assert gpus_text(env) == text


def test_the_machine_line_gives_cpu_cores_and_ram_and_a_question_mark_for_what_was_not_recorded():
    from bench.report.table import cpu_text

    env = {"cpu_model": "AMD EPYC 9B14", "cpu_logical_cores": 2, "ram_bytes": 24 * 2**30 + 2**29}
    assert cpu_text(env) == "AMD EPYC 9B14 (2 logical cores), RAM 24.5 GiB"
    assert cpu_text({}) == "? (? logical cores), RAM ?"
    assert cpu_text({"cpu_model": "", "cpu_logical_cores": None, "ram_bytes": 0}) == "? (? logical cores), RAM ?"


def test_a_figure_carries_its_interval_coverage_and_is_noisy_below_ninety_percent():
    from bench.report.table import figure

    one, five = record("one", reps=1), record("five", reps=5, noise=0.01)
    assert figure(one, "tpot_ms").coverage == 0.0 and figure(one, "tpot_ms").noisy
    assert figure(one, "decode_tokens_per_s").coverage == 0.0  # a rate reads its summary's coverage
    assert figure(five, "tpot_ms").coverage == 0.9375 and not figure(five, "tpot_ms").noisy
    assert figure(five, "kld_mean").coverage is None  # drift: a standard error, no repetitions


def test_the_speedup_basis_names_the_reference_or_says_there_is_none():
    from bench.report.table import group_records, speedup_basis

    (with_ref,) = group_records([record("fp32", steps=0), record("q8")])
    assert speedup_basis(with_ref) == "fp32 p50 e2e_ms / the variant's, with a bootstrap 95% interval."
    (without,) = group_records([record("q8"), record("q4")])
    assert speedup_basis(without) == ("none: no ok reference variant in this group (fp32, or a variant whose recipe "
                                      "has no steps).")
