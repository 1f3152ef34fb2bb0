"""The metric catalogue: every metric a cell record can hold, with its unit, direction and format.

One table, read by the summary, the reports, ``select``, ``export`` and the schema test.
Adding a metric to a record means adding one ``Metric`` here (and its property in
``bench/schema/cell-record.schema.json``; a test checks both agree).

Asking about a metric::

    from bench.catalogue import metric
    m = metric("tpot_ms")
    m.direction       # "lower" | "higher" | None (informational: not better either way)
    m.kind            # "speed" | "memory" | "size" | "drift" | "info"
    m.better(a, b)    # True when value a is better than b
    m.format(v)       # display string, e.g. "3.24"

Reading a record::

    point(record, "ttft_ms")      # the p50 of a summary metric, or the scalar value
    interval(record, "ttft_ms")   # (low, high): the 95% CI of the median, or value +- 1.96 stderr
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from optimize.errors import InputError

Direction = Literal["lower", "higher"]
Kind = Literal["speed", "memory", "size", "drift", "info"]
Shape = Literal["scalar", "summary", "object", "boolean"]

MIB = 2**20


@dataclass(frozen=True)
class Metric:
    """One metric of a cell record.

    Attributes:
        key: the record's key under ``metrics`` (units in the name).
        unit: the unit of the stored value ("ms", "tokens/s", "bytes", "nats", "ratio", ...).
        direction: which way is better; None for informational figures.
        label: a short column label for tables and plots (display units).
        fmt: a ``format`` spec for the displayed value.
        kind: what the figure is about.
        shape: "summary" (a ``stats.summarize`` dict: n, p50, ci95_p50, ...), "scalar", "object", "boolean".
        scale: the displayed value is the stored value times this (bytes shown as MiB).
        ci_key: a sibling summary metric holding the interval of a scalar (e.g. a rate's median).
        stderr_key: a sibling metric with the standard error of a scalar mean.
        scales_with: a rate this figure is a fixed multiple of (a roofline figure of its rate's median):
            its interval is that rate's, scaled, and it summarises the rate's repetitions.
        description: one line for documentation.

    """

    key: str
    unit: str
    direction: Direction | None
    label: str
    fmt: str
    kind: Kind
    shape: Shape = "scalar"
    scale: float = 1.0
    ci_key: str | None = None
    stderr_key: str | None = None
    scales_with: str | None = None
    description: str = ""

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b`` by this metric's direction."""
        if self.direction is None:
            raise InputError(f"metric {self.key!r} is informational: it has no better direction")
        return a < b if self.direction == "lower" else a > b

    @property
    def shown_unit(self) -> str:
        """The unit of the figures ``format`` prints: scaled metrics name theirs last in the label ("peak MiB")."""
        return self.label.rsplit(" ", 1)[-1] if self.scale != 1 else self.unit

    def format(self, value: Any) -> str:
        """The displayed string (scaled), or "-" when there is no number."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "-"
        return format(value * self.scale, self.fmt)


def _m(key, unit, direction, label, fmt, kind, **kw) -> Metric:
    return Metric(key, unit, direction, label, fmt, kind, **kw)


_METRICS = [
    # Latency: summaries over repetitions (ITL pools every token gap).
    _m("ttft_ms", "ms", "lower", "TTFT ms", ".2f", "speed", shape="summary", description="time to first token"),
    _m("tpot_ms", "ms", "lower", "TPOT ms", ".2f", "speed", shape="summary",
       description="(e2e - ttft) / (new tokens - 1), per request"),
    _m("e2e_ms", "ms", "lower", "e2e ms", ".1f", "speed", shape="summary", description="end-to-end request latency"),
    _m("itl_ms", "ms", "lower", "ITL ms", ".2f", "speed", shape="summary", description="inter-token gaps, pooled"),
    # Throughput: medians over repetitions, with their summaries beside them.
    _m("prefill_tokens_per_s", "tokens/s", "higher", "prefill tok/s", ".0f", "speed",
       ci_key="prefill_tokens_per_s_summary", description="batch x prompt tokens / TTFT, median"),
    _m("decode_tokens_per_s", "tokens/s", "higher", "decode tok/s", ".1f", "speed",
       ci_key="decode_tokens_per_s_summary", description="batch x (new - 1) tokens / (e2e - TTFT), median"),
    _m("prefill_tokens_per_s_summary", "tokens/s", "higher", "prefill tok/s", ".0f", "speed", shape="summary"),
    _m("decode_tokens_per_s_summary", "tokens/s", "higher", "decode tok/s", ".1f", "speed", shape="summary"),
    _m("measured_wall_s", "s", None, "measured s", ".2f", "info", description="wall time of the timed repetitions"),
    # Memory.
    _m("peak_memory_bytes", "bytes", "lower", "peak MiB", ".1f", "memory", scale=1 / MIB,
       description="CPU: peak RSS of the cell process; CUDA: allocator max_memory_allocated; load included"),
    _m("serving_peak_memory_bytes", "bytes", "lower", "serving peak MiB", ".1f", "memory", scale=1 / MIB,
       description="peak_memory_bytes over warm-up and timed repetitions alone (the peak reset after load)"),
    _m("load_peak_memory_bytes", "bytes", "lower", "load peak MiB", ".1f", "memory", scale=1 / MIB,
       description="peak_memory_bytes up to the end of the variant's load (runtime techniques applied)"),
    _m("rss_baseline_bytes", "bytes", None, "RSS before load MiB", ".1f", "memory", scale=1 / MIB),
    _m("rss_increase_bytes", "bytes", "lower", "RSS increase MiB", ".1f", "memory", scale=1 / MIB),
    _m("host_peak_rss_bytes", "bytes", "lower", "host peak MiB", ".1f", "memory", scale=1 / MIB),
    _m("cuda_max_allocated_bytes", "bytes", "lower", "CUDA allocated MiB", ".1f", "memory", scale=1 / MIB),
    _m("cuda_max_reserved_bytes", "bytes", "lower", "CUDA reserved MiB", ".1f", "memory", scale=1 / MIB),
    _m("nvml_process_bytes", "bytes", "lower", "NVML MiB", ".1f", "memory", scale=1 / MIB,
       description="device memory NVML attributes to the process; null when unknown"),
    _m("decode_memory_estimate_bytes", "bytes", None, "decode estimate MiB", ".1f", "memory", scale=1 / MIB),
    # Size.
    _m("weights_bytes", "bytes", "lower", "weights MiB", ".1f", "size", scale=1 / MIB),
    _m("kv_cache_bytes_per_token", "bytes", "lower", "KV B/token", ".0f", "size"),
    _m("embedding_bytes_not_read", "bytes", None, "embedding not read MiB", ".1f", "size", scale=1 / MIB),
    # Roofline: how close the measured rate comes to the device's measured ceilings.
    _m("decode_bytes_per_step", "bytes", None, "bytes/step MiB", ".1f", "size", scale=1 / MIB),
    _m("decode_bandwidth_gbps", "GB/s", "higher", "BW GB/s", ".2f", "speed", scales_with="decode_tokens_per_s",
       description="bytes read per decode step x decode steps/s"),
    _m("roofline_fraction", "ratio", "higher", "roofline", ".2f", "speed", scales_with="decode_tokens_per_s",
       description="decode bandwidth achieved / measured copy bandwidth"),
    _m("prefill_tflops", "TFLOP/s", "higher", "prefill TFLOP/s", ".3f", "speed", scales_with="prefill_tokens_per_s",
       description="prompt-pass FLOPs (counted as the variant runs it) / TTFT"),
    _m("prefill_flops_fraction", "ratio", "higher", "prefill FLOP frac", ".2f", "speed",
       scales_with="prefill_tokens_per_s",
       description="prefill FLOP/s achieved / measured matmul rate of the compute dtype"),
    _m("roofline_ceilings", "", None, "ceilings", "", "info", shape="object"),
    # Drift against the fp32 reference.
    _m("perplexity", "ppl", "lower", "ppl", ".2f", "drift", stderr_key="perplexity_stderr"),
    _m("perplexity_stderr", "ppl", None, "ppl stderr", ".3f", "drift"),
    _m("reference_perplexity", "ppl", None, "ref ppl", ".2f", "drift"),
    _m("ppl_ratio", "ratio", "lower", "ppl ratio", ".4f", "drift", description="exp(mean ln ratio)"),
    _m("ln_ppl_ratio", "nats", "lower", "ln ppl ratio", ".4f", "drift", stderr_key="ln_ppl_ratio_stderr"),
    _m("ln_ppl_ratio_stderr", "nats", None, "ln ppl ratio stderr", ".4f", "drift"),
    _m("kld_mean", "nats", "lower", "KLD mean", ".2e", "drift", stderr_key="kld_mean_stderr",
       description="KL(reference || variant) per token"),
    _m("kld_mean_stderr", "nats", None, "KLD stderr", ".1e", "drift"),
    _m("kld_median", "nats", "lower", "KLD median", ".2e", "drift"),
    _m("kld_p90", "nats", "lower", "KLD p90", ".2e", "drift"),
    _m("kld_p95", "nats", "lower", "KLD p95", ".2e", "drift"),
    _m("kld_p99", "nats", "lower", "KLD p99", ".2e", "drift"),
    _m("kld_p999", "nats", "lower", "KLD p99.9", ".2e", "drift"),
    _m("kld_min", "nats", None, "KLD min", ".2e", "drift"),
    _m("kld_max", "nats", "lower", "KLD max", ".2e", "drift"),
    _m("top1_agreement", "fraction", "higher", "top-1", ".3f", "drift", stderr_key="top1_agreement_stderr"),
    _m("top1_agreement_stderr", "fraction", None, "top-1 stderr", ".4f", "drift"),
    _m("delta_p_mean", "probability", None, "Δp mean", ".4f", "drift",
       description="change of the reference's top-token probability"),
    _m("delta_p_median", "probability", None, "Δp median", ".4f", "drift"),
    _m("delta_p_p01", "probability", None, "Δp p1", ".4f", "drift"),
    _m("delta_p_p99", "probability", None, "Δp p99", ".4f", "drift"),
    _m("delta_p_rms", "probability", "lower", "Δp RMS", ".4f", "drift"),
    _m("gen_exact_match", "fraction", "higher", "gen match", ".3f", "drift",
       description="fraction of greedy continuations identical to the reference's"),
    _m("gen_common_prefix_mean", "tokens", "higher", "gen prefix", ".1f", "drift",
       description="mean tokens a greedy continuation shares with the reference's before diverging"),
    _m("scored_tokens", "tokens", None, "scored tokens", "d", "info"),
    _m("drift_meaningful", "", None, "drift meaningful", "", "info", shape="boolean",
       description="false when the reference has random weights (figures show mechanics only)"),
    _m("drift_through_cache", "", None, "drift via cache", "", "info", shape="boolean",
       description="true when drift was scored through the variant's own KV cache (teacher-forced decoding)"),
    _m("drift_kv_quantized_scored_tokens", "tokens", None, "tokens read quantized KV", "d", "info",
       description="scored tokens predicted by a step that read quantized KV-cache entries"),
    _m("drift_wall_s", "s", None, "drift s", ".2f", "info"),
]

METRICS: dict[str, Metric] = {m.key: m for m in _METRICS}
assert len(METRICS) == len(_METRICS), "duplicate metric key"
# Every figure drift scoring adds to a record: the drift metrics and the facts about how they were scored.
DRIFT_KEYS = frozenset(k for k, m in METRICS.items() if m.kind == "drift" or k.startswith("drift_")
                       or k == "scored_tokens")


def metric(key: str, shapes: tuple[str, ...] | None = None) -> Metric:
    """The catalogue entry for ``key``; unknown keys raise InputError with the closest names.

    ``shapes``: the caller takes metrics of these shapes only; the names suggested are of those.
    """
    try:
        return METRICS[key]
    except KeyError:
        names = [k for k, m in METRICS.items() if shapes is None or m.shape in shapes]
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise InputError(f"unknown metric {key!r}{hint}") from None


def comparable(key: str) -> Metric:
    """``metric(key)``, required to have a direction (usable as an objective or a gate)."""
    m = metric(key)
    if m.direction is None:
        ranked = [k for k, v in METRICS.items() if v.direction is not None]
        raise InputError(f"metric {key!r} is informational (no better direction); choose one of {', '.join(ranked)}")
    return m


def point(record: dict[str, Any], key: str) -> float | None:
    """The metric's point value in ``record`` (the p50 of a summary), or None when absent."""
    value = (record.get("metrics") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("p50")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def interval(record: dict[str, Any], key: str) -> tuple[float, float] | None:
    """The 95% interval of the metric's point value, or None when the record has none.

    Summaries give their order-statistic CI of the median; scalars take their summary's
    (``ci_key``: recorded, or computed from the record's samples of the rate), their rate's scaled
    (``scales_with``), or mean +- 1.96 standard errors (``stderr_key``).
    """
    metrics = record.get("metrics") or {}
    m = METRICS.get(key)
    value = point(record, key)
    if m is not None and m.scales_with:
        rate, rate_ci = point(record, m.scales_with), interval(record, m.scales_with)
        if value is None or not rate or rate_ci is None:
            return None
        return rate_ci[0] * value / rate, rate_ci[1] * value / rate
    summary = repetition_summary(record, key)
    if isinstance(summary, dict) and isinstance(summary.get("ci95_p50"), list) and len(summary["ci95_p50"]) == 2:
        if summary.get("ci_coverage") == 0:  # one repetition: [x, x] covers nothing, so there is no interval
            return None
        low, high = summary["ci95_p50"]
        return float(low), float(high)
    stderr = metrics.get(m.stderr_key) if m and m.stderr_key else None
    if value is not None and isinstance(stderr, (int, float)):
        return value - 1.96 * stderr, value + 1.96 * stderr
    return None


def repetition_summary(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The summary over repetitions behind the metric: the recorded one (its own, or its ``ci_key``'s),
    else, for a rate, one computed from the record's samples of it (a generate cell keeps its
    prefill rate's repetitions but no summary of them); a roofline figure's is its rate's
    (``scales_with``); None where neither is there.
    """
    m = METRICS.get(key)
    if m is not None and m.scales_with:
        return repetition_summary(record, m.scales_with)
    summary = _summary(record, key)
    if summary is not None or m is None or not m.ci_key:  # a summary metric missing is not measured
        return summary
    values = (record.get("samples") or {}).get(key)
    if isinstance(values, list) and values and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        from bench.stats import summarize

        return summarize([float(v) for v in values])
    return None


def _summary(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The summary over repetitions behind the metric's point value (its own, or its ``ci_key``'s)."""
    metrics = record.get("metrics") or {}
    m = METRICS.get(key)
    summary = metrics.get(key) if m is None or m.shape == "summary" else metrics.get(m.ci_key or "")
    return summary if isinstance(summary, dict) else None


def sample_count(record: dict[str, Any], key: str) -> int | None:
    """How many repetitions the metric's point value summarises, when known."""
    summary = repetition_summary(record, key)
    return int(summary["n"]) if summary and "n" in summary else None


# Below this coverage an interval of the median says little: [min, max] of 4 repetitions holds the
# median 87.5% of the time, of 2 only half, of 1 never (it has no width). 5 repetitions give 93.75%.
MIN_CI_COVERAGE = 0.9


def interval_coverage(record: dict[str, Any], key: str) -> float | None:
    """The true coverage of the metric's interval of the median (``ci_coverage``), when recorded."""
    summary = repetition_summary(record, key)
    cov = summary.get("ci_coverage") if summary else None
    return float(cov) if isinstance(cov, (int, float)) and not isinstance(cov, bool) else None


def coverage_too_low(coverage: float | None) -> bool:
    """True when an interval of this true coverage rests on too few repetitions to say anything."""
    return coverage is not None and coverage < MIN_CI_COVERAGE


def too_few_repetitions(record: dict[str, Any], key: str) -> bool:
    """True when the metric's interval rests on too few repetitions to tell it from another's."""
    return coverage_too_low(interval_coverage(record, key))
