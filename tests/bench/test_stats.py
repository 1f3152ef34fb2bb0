"""Summaries and the order-statistic confidence interval of the median."""

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
