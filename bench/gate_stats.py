"""The pure statistics of the regression gate: ratio interval, rank test, FDR, MDE, verdict.

Samples come in *blocks*: the repetitions measured in one process. Timing noise has two
levels, within a process (a few percent) and between processes (a neighbour's burst of
load can slow one whole process many times over). When a side has two or more blocks the
bootstrap resamples whole blocks, so a single wild block widens the interval instead of
moving the verdict; with one block per side it can only resample repetitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Blocks = Sequence[Sequence[float]]  # one inner sequence per process

VERDICTS = ("regressed", "improved", "unchanged", "inconclusive")


MAX_RESAMPLES = 100_000


@dataclass(frozen=True)
class GateConfig:
    """Thresholds and test settings of the gate (the defaults every entry point shares)."""

    speed_threshold: float = 0.05  # relative change a latency or throughput must exceed to count
    memory_threshold: float = 0.02  # peak memory is far steadier than timing, so the band is tighter
    fdr: float = 0.01  # Benjamini-Hochberg false discovery rate over all comparisons of a run
    level: float = 0.99  # confidence level of the bootstrap interval of the ratio
    n_resamples: int = 2000
    power: float = 0.8  # power at which the minimum detectable effect is stated
    # Speed verdicts need this many processes per side: one process shows only the noise within
    # it, and on a shared machine whole processes shift (seen here: 2-3x between two runs).
    min_processes: int = 2
    seed: int = 0

    def validate(self) -> None:
        from optimize.errors import InputError

        for name in ("speed_threshold", "memory_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)}")
        for name in ("fdr", "level", "power"):
            if not 0 < getattr(self, name) < 1:
                raise InputError(f"--{name} must be in (0, 1), got {getattr(self, name)}")
        if self.min_processes < 1:
            raise InputError(f"--min-processes must be >= 1, got {self.min_processes}")
        if not 100 <= self.n_resamples <= MAX_RESAMPLES:  # beyond it the Monte Carlo error is far below the noise
            raise InputError(f"--n-resamples must be in [100, {MAX_RESAMPLES}], got {self.n_resamples}")

    def threshold(self, kind: str) -> float:
        return self.memory_threshold if kind == "memory" else self.speed_threshold


def pooled(blocks: Blocks) -> np.ndarray:
    return np.concatenate([np.asarray(b, dtype=float) for b in blocks]) if blocks else np.empty(0)


def _padded(blocks: Blocks) -> np.ndarray:
    """(n_blocks, max_len) with NaN padding; one sample per block when there is a single block."""
    if len(blocks) == 1:
        blocks = [[x] for x in blocks[0]]
    width = max(len(b) for b in blocks)
    out = np.full((len(blocks), width), np.nan)
    for i, b in enumerate(blocks):
        out[i, :len(b)] = b
    return out


def ratio_interval(base: Blocks, head: Blocks, level: float, n_resamples: int, seed: int) -> tuple[float, float, float]:
    """Ratio of medians head/base with a percentile bootstrap interval.

    Where a side has several blocks the interval is the union of a block bootstrap (whole
    processes resampled: it sees between-process noise) and a sample bootstrap (repetitions
    resampled: its width is stable, where a handful of blocks can by chance look steady).

    Returns:
        (ratio, low, high).

    """
    b_all, h_all = pooled(base), pooled(head)
    ratio = float(np.median(h_all) / np.median(b_all))
    if len(b_all) < 2 or len(h_all) < 2:  # nothing to bootstrap: the interval spans every pairing
        return ratio, float(h_all.min() / b_all.max()), float(h_all.max() / b_all.min())
    low, high = _bootstrap(_padded([b_all]), _padded([h_all]), level, n_resamples, seed)
    if len(base) > 1 or len(head) > 1:
        b_low, b_high = _bootstrap(_padded(base), _padded(head), level, n_resamples, seed + 1)
        low, high = min(low, b_low), max(high, b_high)
    return ratio, low, high


def _bootstrap(b_mat: np.ndarray, h_mat: np.ndarray, level: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of median(head)/median(base), resampling the rows (blocks) of each matrix.

    scipy.stats.bootstrap resamples row indices per side; the statistic pools the chosen rows.
    """
    from scipy.stats import bootstrap

    # np.nanmedian is several times slower than np.median: use it only for unequal blocks.
    med_b = np.nanmedian if np.isnan(b_mat).any() else np.median
    med_h = np.nanmedian if np.isnan(h_mat).any() else np.median

    def statistic(ib: np.ndarray, ih: np.ndarray, axis: int = -1) -> np.ndarray:
        # ib: (..., n_base_blocks) block indices -> (..., n_blocks * width) pooled values
        b = b_mat[ib.astype(int)].reshape(*ib.shape[:-1], -1)
        h = h_mat[ih.astype(int)].reshape(*ih.shape[:-1], -1)
        return med_h(h, axis=-1) / med_b(b, axis=-1)

    # The statistic takes ``axis``, so scipy calls it on whole batches of resamples (vectorised).
    res = bootstrap((np.arange(len(b_mat)), np.arange(len(h_mat))), statistic,
                    n_resamples=n_resamples, confidence_level=level, method="percentile",
                    paired=False, batch=max(1, 200_000 // (b_mat.size + h_mat.size)), rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def rank_p(base: Blocks, head: Blocks) -> float:
    """Two-sided Mann-Whitney U p-value on the pooled samples (1.0 when it cannot be computed)."""
    from scipy.stats import mannwhitneyu

    b, h = pooled(base), pooled(head)
    if len(b) < 2 or len(h) < 2:
        return 1.0  # (two sides all tied at one value need no guard: scipy gives 1.0)
    return float(mannwhitneyu(h, b, alternative="two-sided").pvalue)


def min_rank_p(n_base: int, n_head: int) -> float:
    """Smallest two-sided p-value a Mann-Whitney U test can give with these sample counts."""
    if n_base < 1 or n_head < 1:
        return 1.0
    return 2.0 / math.comb(n_base + n_head, n_base)  # at least 2 orderings when both sides have a sample


def bh_adjust(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control)."""
    from scipy.stats import false_discovery_control

    if not len(pvalues):
        return []
    return [float(q) for q in false_discovery_control(np.asarray(pvalues, dtype=float), method="bh")]


def robust_cv(blocks: Blocks) -> float:
    """Coefficient of variation from the median absolute deviation (insensitive to a wild block)."""
    x = pooled(blocks)
    if len(x) < 2:
        return math.nan
    med = float(np.median(x))
    if med == 0:
        return math.nan
    return float(1.4826 * np.median(np.abs(x - med)) / abs(med))


def mde(cv: float, n_base: int, n_head: int, level: float = 0.99, power: float = 0.8, fdr: float = 0.01,
        process_var: float | None = None, blocks: tuple[int, int] = (1, 1)) -> float:
    """Minimum detectable relative change of the median at ``power``, given noise ``cv``.

    (z_{1-alpha/2} + z_power) x CV x sqrt(1/n_base + 1/n_head) x sqrt(pi/2): the usual formula
    for a mean, times the median's efficiency loss under normal noise. Infinite when the rank
    test cannot reach ``fdr`` with so few samples. With ``process_var`` (the variance of a whole
    process's log level beyond its repetitions' noise, see ``process_noise``) the standard
    error gains that variance over the ``blocks`` (processes per side): repetitions of one process
    share its level, so more of them do not average a shift of the whole process away.
    """
    from scipy.stats import norm

    if min_rank_p(n_base, n_head) > fdr:
        return math.inf
    if math.isnan(cv):
        return math.nan
    z = norm.ppf(1 - (1 - level) / 2) + norm.ppf(power)
    var = cv ** 2 * (1 / n_base + 1 / n_head) * math.pi / 2
    if process_var:
        var += process_var * (1 / blocks[0] + 1 / blocks[1])
    return float(z * math.sqrt(var))


@dataclass(frozen=True)
class ProcessNoise:
    """How much whole processes vary beyond their repetitions' noise, pooled over a run pair's cells."""

    var: float  # variance of a process's log level beyond what its repetitions explain (>= 0)
    df: int  # degrees of freedom of the pooled estimate (processes less one, summed over the cell-sides kept)


def _log_levels(blocks: Blocks) -> tuple[np.ndarray, float] | None:
    """Each process's log median, and the variance its own repetitions give that median on average
    (pi/2 x s^2 / n, s the robust sd of the log repetitions about their process's median).
    """
    values = [np.asarray(b) for b in blocks if len(b)]  # numbers (``bench.compare.metric_blocks`` makes floats)
    if not values or not all((np.isfinite(v) & (v > 0)).all() for v in values):
        return None
    logs = [np.log(v) for v in values]
    medians = np.array([np.median(b) for b in logs])
    deviations = np.concatenate([b - np.median(b) for b in logs if len(b) > 1] or [[]])
    s = 1.4826 * float(np.median(np.abs(deviations))) if len(deviations) else 0.0
    return medians, math.pi / 2 * s ** 2 * float(np.mean([1 / len(b) for b in logs]))


def process_noise(cell_sides: Sequence[Blocks]) -> ProcessNoise | None:
    """The between-process component of a one-way random-effects model, pooled over cell-sides.

    Each cell-side (one cell's processes in one run) with two or more processes gives the sample
    variance of its processes' log medians; the pooled variance less the part the repetitions'
    own noise explains is the component. A machine whose speed moves between processes (a
    neighbour's load, clocks) moves every cell alike, so one estimate serves all of them. Pooled
    as a df-weighted mean, after dropping cell-sides whose spread lies beyond the 99.9th
    percentile of what a median-based estimate predicts (one process slowed 30x in one cell does
    not set it for every cell). None when no cell-side has two processes.
    """
    from scipy.stats import chi2

    spreads, within, dfs = [], [], []
    for blocks in cell_sides:
        levels = _log_levels(blocks)
        if levels is None or len(levels[0]) < 2:
            continue
        spreads.append(float(np.var(levels[0], ddof=1)))
        within.append(levels[1])
        dfs.append(len(levels[0]) - 1)
    if not spreads:
        return None
    s2, w, df = np.array(spreads), np.array(within), np.array(dfs)
    if len(s2) > 2:
        scale = float(np.median(s2 * df / chi2.median(df)))
        keep = s2 <= scale * chi2.ppf(0.999, df) / df
        s2, w, df = s2[keep], w[keep], df[keep]
    return ProcessNoise(max(0.0, float(np.average(s2 - w, weights=df))), int(df.sum()))


def process_p(base: Blocks, head: Blocks, noise: ProcessNoise) -> float:
    """Two-sided p-value of the change in mean log process level, against the variation of whole processes.

    Each process counts once: Var = (var + w_base)/k_base + (var + w_head)/k_head with ``var``
    the pooled between-process component and w each side's repetition noise of a process median;
    Student's t with the pooled degrees of freedom. Repetitions of one process share its level,
    so this is the test of a change that processes, not repetitions, must show.
    """
    from scipy.stats import t

    b, h = _log_levels(base), _log_levels(head)
    if b is None or h is None:
        return 1.0
    delta = float(np.mean(h[0]) - np.mean(b[0]))
    se2 = (noise.var + b[1]) / len(b[0]) + (noise.var + h[1]) / len(h[0])
    if se2 <= 0:
        return 1.0 if delta == 0 else 0.0
    return float(2 * t.sf(abs(delta) / math.sqrt(se2), noise.df))


def worse_is_higher(direction: str) -> bool:
    """True when a larger head/base ratio is worse (latency, memory)."""
    return direction == "lower"


def beyond_mde(ratio: float, mde_value: float | None) -> bool:
    """True when the change (a head/base ratio) is at least the MDE on either side, symmetric on the log
    scale, or there is no MDE to hold it to (``None``: untested or no noise figure).

    A gate whose threshold is below the MDE reports noise (changes it cannot reliably tell from the
    noise it observed): a change smaller than the MDE gets no verdict, whatever its interval.
    """
    if mde_value is None:
        return True
    return abs(math.log(ratio)) >= math.log(1 + mde_value)


def verdict(ratio_low: float, ratio_high: float, significant: bool, threshold: float, direction: str) -> str:
    """The verdict for one comparison.

    ``regressed`` (``improved``) only when the whole interval lies beyond the threshold on the
    worse (better) side and the test is significant after correction; ``unchanged`` when the
    whole interval lies inside the band; ``inconclusive`` otherwise.
    """
    up, down = 1 + threshold, 1 / (1 + threshold)  # symmetric on the log scale
    beyond_up, beyond_down = ratio_low > up, ratio_high < down
    if significant and (beyond_up or beyond_down):
        return "regressed" if beyond_up == worse_is_higher(direction) else "improved"
    if down <= ratio_low and ratio_high <= up:
        return "unchanged"
    return "inconclusive"
