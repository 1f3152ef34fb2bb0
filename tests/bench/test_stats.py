"""Summaries and the order-statistic confidence interval of the median."""

import math

import pytest

from bench.stats import median_ci, summarize


def test_median_ci_matches_binomial_order_statistics():
    # n = 100: the classic 95% interval is the 40th..61st order statistics (1-based).
    low, high, coverage = median_ci(list(range(100)))
    assert (low, high) == (39, 60)
    assert 0.95 <= coverage < 0.97


def test_median_ci_with_few_samples_reports_true_coverage():
    low, high, coverage = median_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (low, high) == (1.0, 5.0)
    assert coverage == pytest.approx(1 - 2 / 32)


def test_summarize_fields():
    s = summarize([3.0, 1.0, 2.0, 4.0])
    assert s["n"] == 4 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["mean"] == pytest.approx(2.5) and s["p50"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(1.2909944, rel=1e-6)  # sample standard deviation
    assert s["ci95_p50"][0] <= s["p50"] <= s["ci95_p50"][1]


def _coverage_by_hand(n: int, lo: int) -> float:
    """P(lo < X <= n-1-lo) for X ~ Binomial(n, 1/2): the order statistics X(lo), X(n-1-lo) straddle the median."""
    return sum(math.comb(n, k) for k in range(lo + 1, n - lo)) / 2**n


def test_median_ci_coverage_equals_the_binomial_sum():
    low, high, coverage = median_ci(list(range(100)))
    assert coverage == pytest.approx(_coverage_by_hand(100, 39), abs=1e-12)
    # one order statistic further in would fall short of 95%
    assert _coverage_by_hand(100, 40) < 0.95 <= _coverage_by_hand(100, 39)


def test_median_ci_at_lower_levels_moves_inwards():
    data = list(range(10))
    # n = 10: [X(1), X(8)] covers 1 - 2 x (1 + 10) / 1024 = 0.978515625, [X(2), X(7)] 1 - 2 x 56 / 1024
    # = 0.890625, [X(3), X(6)] (210 + 252 + 210) / 1024 = 0.65625 (0-based order statistics)
    assert median_ci(data) == (1, 8, pytest.approx(0.978515625))
    assert median_ci(data, level=0.8) == (2, 7, pytest.approx(0.890625))
    assert median_ci(data, level=0.6) == (3, 6, pytest.approx(0.65625))
    coverage = median_ci(data, level=0.8)[2]
    assert median_ci(data, level=coverage)[:2] == (2, 7)  # a level met exactly is met
    assert median_ci(list(range(7)), level=0.0) == (3, 3, 0.0)  # level 0: the sample median itself


def test_median_ci_of_tiny_samples():
    assert median_ci([4.0, 6.0]) == (4.0, 6.0, 0.5)  # P(X = 1) for n = 2
    assert median_ci([5.0]) == (5.0, 5.0, 0.0)
    low, high, coverage = median_ci([])
    assert math.isnan(low) and math.isnan(high) and coverage == 0.0


def test_summarize_every_field_by_hand():
    s = summarize([float(x) for x in range(10, 0, -1)])  # 10 .. 1, unsorted on purpose
    expected_coverage = round(_coverage_by_hand(10, 1), 4)
    assert s == {"n": 10, "mean": 5.5, "std": pytest.approx(math.sqrt(82.5 / 9)), "min": 1.0, "max": 10.0,
                 "p50": 5.5, "p90": pytest.approx(9.1), "p99": pytest.approx(9.91), "ci95_p50": [2.0, 9.0],
                 "ci_coverage": expected_coverage}
    assert expected_coverage == 0.9785  # 0.978515625, rounded to 4 digits


def test_summarize_small_and_empty_samples():
    assert summarize([]) == {"n": 0}
    one = summarize([3.0])
    assert one["n"] == 1 and one["std"] == 0.0 and one["ci_coverage"] == 0.0 and one["ci95_p50"] == [3.0, 3.0]
    two = summarize([1.0, 3.0])
    assert two["std"] == pytest.approx(math.sqrt(2)) and two["ci_coverage"] == 0.5
    ints = summarize([1, 2])  # integers are summarised as floats
    assert all(type(ints[k]) is float for k in ("mean", "std", "min", "max", "p50", "p90", "p99"))
