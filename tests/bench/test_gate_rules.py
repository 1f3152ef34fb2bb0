"""The regression gate's rules, exactly: verdict bands, the rank test, BH correction, MDE, noise and settings.

test_compare.py judges the gate on samples with known distributions (false-alarm and detection
rates); these tests pin each statistic to its definition with hand-computed figures.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.stats import chi2, mannwhitneyu, norm
from scipy.stats import t as student_t

from bench import gate_stats as gs
from optimize.errors import InputError

UP = 1 + 0.05
DOWN = 1 / UP


@pytest.mark.parametrize(("low", "high", "significant", "direction", "want"), [
    (UP, 1.2, True, "lower", "inconclusive"),  # the interval touches the band: not beyond it
    (UP * 1.0001, 1.2, True, "lower", "regressed"),
    (0.8, DOWN, True, "lower", "inconclusive"),
    (0.8, DOWN * 0.9999, True, "lower", "improved"),  # a lower latency
    (0.8, DOWN * 0.9999, True, "higher", "regressed"),  # fewer tokens/s
    (UP * 1.0001, 1.2, True, "higher", "improved"),
    (DOWN, UP, False, "lower", "unchanged"),  # the band's ends are inside it
    (DOWN, UP, True, "higher", "unchanged"),
    (DOWN * 0.9999, UP, False, "lower", "inconclusive"),
    (DOWN, UP * 1.0001, False, "lower", "inconclusive"),
    (0.8, 1.2, True, "lower", "inconclusive"),  # wider than the band on both sides
    (0.8, DOWN * 0.9999, False, "lower", "inconclusive"),  # beyond but not significant
])
def test_verdict_bands_are_symmetric_on_the_log_scale_with_strict_edges(low, high, significant, direction, want):
    assert gs.verdict(low, high, significant, 0.05, direction) == want


@pytest.mark.parametrize(("ratio", "mde", "want"), [
    (1 + 0.3, 0.3, True),  # a change of exactly the MDE is detectable by its definition
    (1.2999, 0.3, False),
    (1 / (1 + 0.3), 0.3, True),  # symmetric on the log scale
    (1 / 1.2999, 0.3, False),
    (1.0, 0.0, True),  # no noise: any change at all
    (1.0001, None, True),  # no MDE (untested, or no noise figure): nothing to hold the change to
])
def test_beyond_mde_compares_the_change_with_the_mde_on_the_log_scale(ratio, mde, want):
    assert gs.beyond_mde(ratio, mde) is want


def test_memory_has_its_own_tighter_threshold():
    cfg = gs.GateConfig()
    assert (cfg.threshold("memory"), cfg.threshold("speed")) == (0.02, 0.05)
    cfg = gs.GateConfig(speed_threshold=0.1, memory_threshold=0.01)
    assert (cfg.threshold("memory"), cfg.threshold("speed"), cfg.threshold("status")) == (0.01, 0.1, 0.1)


def test_rank_p_is_scipys_two_sided_mann_whitney_on_the_pooled_samples():
    base, head = [[1.0, 2.5, 3.0], [2.0, 4.0]], [[3.5, 5.0], [6.0, 4.5, 7.0]]
    want = mannwhitneyu([3.5, 5.0, 6.0, 4.5, 7.0], [1.0, 2.5, 3.0, 2.0, 4.0], alternative="two-sided").pvalue
    assert gs.rank_p(base, head) == pytest.approx(want) and gs.rank_p(head, base) == pytest.approx(want)
    assert want < 0.05
    # Two samples a side are enough to compute it.
    two = mannwhitneyu([5.0, 6.0], [1.0, 2.0, 3.0], alternative="two-sided").pvalue
    assert gs.rank_p([[1.0, 2.0, 3.0]], [[5.0, 6.0]]) == pytest.approx(two) and two < 1
    assert gs.rank_p([[5.0, 6.0]], [[1.0, 2.0, 3.0]]) == pytest.approx(two)


@pytest.mark.parametrize(("base", "head"), [([[1.0, 2.0, 3.0, 4.0]], [[10.0]]), ([[1.0]], [[5.0, 6.0, 7.0]]),
                                            ([[2.0, 2.0, 2.0]], [[2.0, 2.0, 2.0]]), ([], [[1.0, 2.0]])])
def test_rank_p_is_one_where_no_test_can_tell(base, head):
    assert gs.rank_p(base, head) == 1.0


def test_all_tied_sides_at_different_values_still_differ():
    p = gs.rank_p([[1.0] * 5], [[2.0] * 5])
    assert p == pytest.approx(mannwhitneyu([2.0] * 5, [1.0] * 5, alternative="two-sided").pvalue) and p < 0.01


def test_min_rank_p_is_two_over_the_number_of_orderings():
    assert gs.min_rank_p(5, 5) == pytest.approx(2 / 252)
    assert gs.min_rank_p(3, 2) == pytest.approx(2 / 10)
    assert gs.min_rank_p(1, 1) == 1.0  # 2 / 2
    assert gs.min_rank_p(1, 3) == gs.min_rank_p(3, 1) == 0.5
    assert gs.min_rank_p(0, 5) == gs.min_rank_p(5, 0) == gs.min_rank_p(0, 0) == 1.0


def test_bh_adjust_matches_the_hand_computed_step_up():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> p*m/rank 0.02, 0.02, 0.04, 0.04 (then the running minimum from the top).
    assert gs.bh_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert gs.bh_adjust([0.04, 0.001]) == pytest.approx([0.04, 0.002])  # Benjamini-Yekutieli would give 0.06, 0.003
    assert gs.bh_adjust([]) == []
    assert all(isinstance(q, float) for q in gs.bh_adjust([0, 1]))


def test_mde_is_the_normal_formula_times_the_medians_efficiency_loss():
    z = norm.ppf(0.995) + norm.ppf(0.8)
    assert gs.mde(0.1, 10, 10) == pytest.approx(z * 0.1 * math.sqrt(0.2) * math.sqrt(math.pi / 2))
    assert gs.mde(0.1, 10, 10) == pytest.approx(0.19155, abs=1e-4)
    z90 = norm.ppf(0.95) + norm.ppf(0.9)
    assert gs.mde(0.05, 8, 12, level=0.9, power=0.9, fdr=0.05) == pytest.approx(
        z90 * 0.05 * math.sqrt(1 / 8 + 1 / 12) * math.sqrt(math.pi / 2))
    assert math.isnan(gs.mde(math.nan, 10, 10))
    # 3 + 3 samples can reach p = 0.1 but not 0.01: infinite (the smallest p is 2/20).
    assert math.isinf(gs.mde(0.1, 3, 3, fdr=0.01)) and math.isfinite(gs.mde(0.1, 3, 3, fdr=0.1))
    assert math.isfinite(gs.mde(0.1, 3, 3, fdr=0.1 + 1e-12)) and math.isinf(gs.mde(0.1, 3, 3, fdr=0.0999))


def test_mde_adds_the_between_process_variance_over_the_processes_per_side():
    z = norm.ppf(0.995) + norm.ppf(0.8)
    within = 0.1 ** 2 * (1 / 10 + 1 / 10) * math.pi / 2
    assert gs.mde(0.1, 10, 10, process_var=0.04, blocks=(2, 5)) == pytest.approx(
        z * math.sqrt(within + 0.04 * (1 / 2 + 1 / 5)))
    assert gs.mde(0.1, 10, 10, process_var=0.0, blocks=(2, 2)) == gs.mde(0.1, 10, 10)
    assert math.isinf(gs.mde(0.1, 2, 2, process_var=0.04, blocks=(2, 2)))  # still untestable


E = math.e


def test_log_levels_are_process_medians_with_their_repetitions_share():
    # Log repetitions about each process's median: (0, 0.1, -0.1) and (0, 0.3, -0.3, 0.2): |dev| median 0.1 of
    # 0, .1, .1, 0, .3, .3, .2; s = 1.4826 x 0.1; a median's variance pi/2 s^2 / n, averaged over n = 3 and 4.
    levels, w = gs._log_levels([[1.0, E ** 0.1, E ** -0.1], [E, E ** 1.3, E ** 0.7, E ** 1.2]])
    assert levels == pytest.approx([0.0, 1.1])  # the median of 0.7, 1, 1.2, 1.3 is 1.1
    devs = [0, 0.1, -0.1, -0.1, 0.2, -0.4, 0.1]
    s = 1.4826 * float(np.median(np.abs(devs)))
    assert w == pytest.approx(math.pi / 2 * s ** 2 * (1 / 3 + 1 / 4) / 2)
    assert gs._log_levels([[2.0], [3.0]])[1] == 0.0  # one figure a process: nothing within it
    # A process of one figure adds no deviation (a zero would halve this MAD), one of two figures adds both.
    _, w = gs._log_levels([[1.0, E ** 0.1, E ** -0.1], [5.0]])
    assert w == pytest.approx(math.pi / 2 * (1.4826 * 0.1) ** 2 * (1 / 3 + 1) / 2)
    _, w = gs._log_levels([[1.0, E ** 0.6], [1.0, E ** 0.6], [1.0, E ** 0.1, E ** -0.1]])  # |dev| .3 x4, 0, .1, .1
    assert w == pytest.approx(math.pi / 2 * (1.4826 * 0.3) ** 2 * (1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert gs._log_levels([[2, 3], [4]])[0] == pytest.approx([math.log(6) / 2, math.log(4)])  # integers too
    assert gs._log_levels([[1.0, 0.0]]) is None and gs._log_levels([[1.0, -1.0]]) is None  # no log level


def test_process_noise_pools_spreads_less_the_repetitions_share_weighted_by_degrees_of_freedom():
    flat = [1.0, 1.0, 1.0]  # no noise within: the spread is all between processes
    two = [[flat, [E ** 0.2] * 3]]  # log levels 0, 0.2: variance 0.02, 1 df
    three = [[flat, [E ** 0.1] * 3, [E ** 0.2] * 3]]  # 0, 0.1, 0.2: variance 0.01, 2 df
    noise = gs.process_noise(two + three)
    assert noise.var == pytest.approx((1 * 0.02 + 2 * 0.01) / 3) and noise.df == 3
    assert gs.process_noise([[flat], [flat, flat]]) == gs.ProcessNoise(0.0, 1)  # a single process adds nothing
    noisy = [[1.0, E ** 0.1, E ** -0.1], [E ** 0.05, E ** 0.15, E ** -0.05]]  # levels 0, 0.05: spread 0.00125
    within = gs._log_levels(noisy)[1]
    assert gs.process_noise([noisy]).var == pytest.approx(max(0.0, 0.00125 - within))
    assert gs.process_noise([noisy]).var == 0.0  # repetitions this noisy explain the whole spread


def test_process_noise_leaves_out_a_cell_side_beyond_the_999th_percentile():
    def spread_of(d, k=3):
        return [[1.0] * 3] + [[E ** (d * j / (k - 1))] * 3 for j in range(1, k)]  # levels 0 .. d evenly

    def variance(d, k=3):
        return float(np.var([d * j / (k - 1) for j in range(k)], ddof=1))

    usual = [spread_of(0.1 * (1 + i / 20)) for i in range(9)]  # 3 processes a cell-side: 2 df each
    spreads = [variance(0.1 * (1 + i / 20)) for i in range(9)]
    median_scale = float(np.median([*spreads, math.inf])) * 2 / chi2.median(2)  # the tenth is the largest
    limit = math.sqrt(median_scale * chi2.ppf(0.999, 2) / 2 / variance(1.0))  # the largest d whose spread is kept
    kept = gs.process_noise(usual + [spread_of(limit * 0.99)])
    dropped = gs.process_noise(usual + [spread_of(limit * 1.01)])
    assert kept.df == 20 and dropped.df == 18
    assert dropped.var == pytest.approx(float(np.mean(spreads)))
    three = gs.process_noise([spread_of(0.1), spread_of(0.1), spread_of(5.0)])  # three: the median rule applies
    assert three.df == 4 and three.var == pytest.approx(variance(0.1))
    pair = gs.process_noise([spread_of(0.1, 40), spread_of(3.0, 40)])  # two cell-sides: a plain mean, none dropped
    assert pair.df == 78 and pair.var == pytest.approx((variance(0.1, 40) + variance(3.0, 40)) / 2)
    flat = gs.process_noise([[[2.0] * 3, [2.0] * 3] for _ in range(4)])  # no spread anywhere: none dropped
    assert flat == gs.ProcessNoise(0.0, 4)


def test_process_p_is_students_t_on_the_mean_process_levels():
    base = [[1.0] * 3, [E ** 0.1] * 3]  # levels 0, 0.1; no noise within
    head = [[E ** 0.3] * 3, [E ** 0.4] * 3, [E ** 0.5] * 3]  # levels 0.3, 0.4, 0.5
    noise = gs.ProcessNoise(0.01, 7)
    t = (0.4 - 0.05) / math.sqrt(0.01 / 2 + 0.01 / 3)
    assert gs.process_p(base, head, noise) == pytest.approx(2 * student_t.sf(t, 7))
    assert gs.process_p(head, base, noise) == gs.process_p(base, head, noise)  # two-sided
    noisy = [[1.0, E ** 0.1, E ** -0.1], [E ** 0.1, E ** 0.2, E ** 0.0]]  # levels 0, 0.1 with noise within
    w = gs._log_levels(noisy)[1]
    t = (0.4 - 0.05) / math.sqrt((0.01 + w) / 2 + 0.01 / 3)
    assert gs.process_p(noisy, head, noise) == pytest.approx(2 * student_t.sf(t, 7))
    same = [[1.0] * 3, [1.0] * 3]
    assert gs.process_p(same, same, gs.ProcessNoise(0.0, 2)) == 1.0  # no noise, no change
    assert gs.process_p(same, base, gs.ProcessNoise(0.0, 2)) < 0.1
    assert gs.process_p([[2.0], [2.0]], [[3.0], [3.0]], gs.ProcessNoise(0.0, 2)) == 0.0  # no noise, a change
    assert gs.process_p([[1.0, 0.0]], head, noise) == 1.0  # no log level: no test


def test_robust_cv_is_the_scaled_median_absolute_deviation_over_the_median():
    # median 3, absolute deviations 2, 1, 0, 1, 97 -> MAD 1: the 100 does not move it.
    assert gs.robust_cv([[1.0, 2.0], [3.0, 4.0, 100.0]]) == pytest.approx(1.4826 / 3)
    assert gs.robust_cv([[-1.0, -2.0, -3.0, -4.0, -100.0]]) == pytest.approx(1.4826 / 3)
    assert math.isnan(gs.robust_cv([[5.0]])) and math.isnan(gs.robust_cv([])) and math.isnan(
        gs.robust_cv([[-1.0, 0.0, 1.0]]))


def test_ratio_interval_without_samples_to_resample_spans_every_pairing():
    assert gs.ratio_interval([[10.0, 12.0]], [[11.0]], 0.99, 500, 0) == pytest.approx((11 / 11, 11 / 12, 11 / 10))
    assert gs.ratio_interval([[10.0]], [[20.0], [22.0]], 0.99, 500, 0) == pytest.approx((21 / 10, 2.0, 2.2))


def test_two_samples_a_side_are_resampled():
    # At a 50% level the bootstrap is strictly inside the range of every pairing (11/12 .. 11.5/10).
    ratio, low, high = gs.ratio_interval([[10.0, 12.0]], [[11.0, 11.5]], 0.5, 1000, 0)
    assert 11 / 12 < low < high < 11.5 / 10 and ratio == 11.25 / 11


def test_constant_sides_give_an_exact_interval_and_one_constant_side_does_not():
    assert gs.ratio_interval([[4.0, 4.0, 4.0]], [[5.0, 5.0]], 0.99, 500, 0) == (1.25, 1.25, 1.25)
    ratio, low, high = gs.ratio_interval([[4.0] * 5], [[5.0, 5.5, 4.5, 5.2, 4.8]], 0.99, 500, 0)
    assert 4.5 / 4 <= low < ratio == 1.25 < high <= 5.5 / 4


def test_the_interval_is_reproducible():
    # Eight processes a side whose means differ far more than their repetitions: the block bootstrap sets the
    # interval, and its ends move with its random draws.
    rng = np.random.default_rng(0)
    base = [list(m * (1 + rng.normal(0, 0.001, 3))) for m in 10 * (1 + rng.normal(0, 0.1, 8))]
    head = [list(m * (1 + rng.normal(0, 0.001, 3))) for m in 11 * (1 + rng.normal(0, 0.1, 8))]
    first = gs.ratio_interval(base, head, 0.9, 200, 7)
    assert first == gs.ratio_interval(base, head, 0.9, 200, 7)
    assert first != gs.ratio_interval(base, head, 0.9, 200, 8)  # the seed matters here, so the equality says something


@pytest.mark.parametrize("wild_side", ["base", "head"])
def test_blocks_on_either_side_bring_in_the_block_bootstrap(wild_side):
    # One side measured in one process, the other in two, one of them slowed 3x by a neighbour: resampling
    # whole processes sees it (the interval reaches the wild process), resampling repetitions barely does.
    one = [[10.0, 10.2, 9.9, 10.1, 10.0, 10.3]]
    two = [[10.1, 10.0, 9.8, 10.2, 9.9, 10.0, 10.3, 9.7, 10.1, 10.0, 9.9, 10.2, 10.0, 10.1], [30.0, 30.5]]
    base, head = (two, one) if wild_side == "base" else (one, two)
    _, low, high = gs.ratio_interval(base, head, 0.99, 1000, 0)
    _, flat_low, flat_high = gs.ratio_interval([gs.pooled(base)], [gs.pooled(head)], 0.99, 1000, 0)
    if wild_side == "head":
        assert high > 2.5 and flat_high < 1.1
    else:
        assert low < 0.4 and flat_low > 0.9


def test_ratio_interval_with_blocks_holds_the_sample_bootstrap():
    rng = np.random.default_rng(2)
    base = [list(10 * np.exp(rng.normal(0, 0.03, 5))) for _ in range(3)]
    head = [list(11 * np.exp(rng.normal(0, 0.03, 5))) for _ in range(3)]
    ratio, low, high = gs.ratio_interval(base, head, 0.99, 1000, seed=4)
    flat_ratio, flat_low, flat_high = gs.ratio_interval([gs.pooled(base)], [gs.pooled(head)], 0.99, 1000, seed=4)
    assert ratio == flat_ratio == pytest.approx(np.median(gs.pooled(head)) / np.median(gs.pooled(base)))
    assert low <= flat_low < ratio < flat_high <= high  # the block bootstrap can only widen it
    _, low50, high50 = gs.ratio_interval(base, head, 0.5, 1000, seed=4)
    assert low < low50 < high50 < high  # a lower level is narrower


def test_pooled_and_padded_blocks():
    assert gs.pooled([]).shape == (0,) and list(gs.pooled([[1, 2], [3]])) == [1.0, 2.0, 3.0]
    assert gs.pooled([[1, 2], [3]]).dtype == np.float64
    padded = gs._padded([[1.0, 2.0], [3.0]])
    assert padded.shape == (2, 2) and padded[0].tolist() == [1.0, 2.0]
    assert padded[1, 0] == 3.0 and np.isnan(padded[1, 1])
    assert gs._padded([[1.0, 2.0, 3.0]]).tolist() == [[1.0], [2.0], [3.0]]  # one block: each repetition alone


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("speed_threshold", 0.0, "--speed-threshold"), ("speed_threshold", 1.0, "--speed-threshold"),
    ("memory_threshold", 0.0, "--memory-threshold"), ("memory_threshold", 1.5, "--memory-threshold"),
    ("fdr", 0.0, "--fdr"), ("fdr", 1.0, "--fdr"), ("level", 1.0, "--level"), ("level", 0.0, "--level"),
    ("power", 1.0, "--power"), ("power", 0.0, "--power"),
    ("min_processes", 0, "--min-processes must be >= 1, got 0"),
    ("n_resamples", 99, "--n-resamples must be in [100, 100000], got 99"),
    ("n_resamples", 100_001, "--n-resamples must be in [100, 100000], got 100001"),
])
def test_gate_settings_are_validated_naming_the_flag(field, value, flag):
    with pytest.raises(InputError, match=f"^{re.escape(flag)}"):
        gs.GateConfig(**{field: value}).validate()
    if flag.endswith(("threshold", "fdr", "level", "power")):
        with pytest.raises(InputError, match=rf"must be in \(0, 1\), got {value}$"):
            gs.GateConfig(**{field: value}).validate()


def test_settings_just_inside_their_ranges_are_accepted():
    gs.GateConfig(speed_threshold=1e-6, memory_threshold=0.999, fdr=0.5, level=0.999, power=0.01,
                  min_processes=1, n_resamples=100).validate()
    gs.GateConfig(n_resamples=gs.MAX_RESAMPLES).validate()
    assert gs.GateConfig() == gs.GateConfig(0.05, 0.02, 0.01, 0.99, 2000, 0.8, 2, 0)


def test_worse_is_higher_for_lower_is_better_metrics():
    assert gs.worse_is_higher("lower") and not gs.worse_is_higher("higher")


def test_blocks_of_unequal_length_give_a_finite_interval():
    # A process cut short by its time budget holds fewer repetitions: padding must not leak into the medians.
    base = [[10.0, 10.2, 9.9, 10.1, 10.0], [10.3, 9.8, 10.1], [10.0, 10.2, 9.9, 10.4]]
    head = [[11.0, 11.3, 10.9], [11.2, 10.8, 11.1, 11.0, 11.4], [11.1, 10.9]]
    ratio, low, high = gs.ratio_interval(base, head, 0.99, 500, 0)
    assert all(math.isfinite(x) for x in (ratio, low, high)) and low < ratio < high
    assert 10.8 / 10.4 <= low and high <= 11.4 / 9.8  # every resampled median lies within each side's range
    # The block bootstrap alone (the union above would hide a NaN from it).
    b_low, b_high = gs._bootstrap(gs._padded(base), gs._padded(head), 0.99, 500, 1)
    assert 10.8 / 10.4 <= b_low < ratio < b_high <= 11.4 / 9.8


def test_the_interval_is_scipys_unpaired_percentile_bootstrap_at_the_configured_level_and_count(monkeypatch):
    import scipy.stats

    calls = []
    real = scipy.stats.bootstrap

    def spy(data, statistic, **kw):
        calls.append({k: kw.get(k) for k in ("method", "confidence_level", "n_resamples", "paired")})
        return real(data, statistic, **kw)

    monkeypatch.setattr(scipy.stats, "bootstrap", spy)
    base, head = [[10.0, 10.2, 9.9], [10.1, 10.3, 9.8]], [[11.0, 11.3, 10.9], [11.2, 10.8, 11.1]]
    gs.ratio_interval(base, head, 0.9, 300, seed=5)
    # Once over the repetitions, once over the processes.
    assert calls == [{"method": "percentile", "confidence_level": 0.9, "n_resamples": 300, "paired": False}] * 2
