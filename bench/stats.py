"""Summaries of repeated measurements."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median_ci(sorted_values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    The number of samples below the true median is Binomial(n, 1/2); the interval is the
    pair of order statistics whose binomial coverage is the smallest at or above ``level``.
    With few samples that coverage cannot be reached: the interval is then [min, max] and
    the coverage returned says so (e.g. 0.9375 for n = 5).

    Returns:
        (low, high, coverage).

    """
    from scipy.stats import binom

    n = len(sorted_values)
    if n == 0:
        return math.nan, math.nan, 0.0

    def coverage(lo: int) -> float:
        # [X(lo), X(n-1-lo)] (0-based) holds the median when lo < #below <= n-1-lo.
        return float(binom.cdf(n - 1 - lo, n, 0.5) - binom.cdf(lo, n, 0.5)) if n > 1 else 0.0

    lo = next((i for i in range((n - 1) // 2, -1, -1) if coverage(i) >= level), 0)
    return float(sorted_values[lo]), float(sorted_values[n - 1 - lo]), coverage(lo)


def summarize(values: Sequence[float]) -> dict[str, float | int | list[float]]:
    """n, mean, sample std, min, max, p50, p90, p99 and the 95% CI of the median."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    n = int(data.size)
    if n == 0:
        return {"n": 0}
    p50, p90, p99 = (float(x) for x in np.percentile(data, [50, 90, 99]))
    low, high, coverage = median_ci(np.sort(data))
    return {
        "n": n,
        "mean": float(data.mean()),
        "std": float(data.std(ddof=1)) if n > 1 else 0.0,
        "min": float(data.min()),
        "max": float(data.max()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "ci95_p50": [low, high],
        "ci_coverage": round(coverage, 4),
    }
