"""The comparison every report renders: cells grouped by scenario, variants as rows.

A *group* is one model on one device under one scenario (name, batch, prompt, new
tokens): only variants measured under the same conditions are compared. Each row holds
catalogue values with their 95% intervals, the speedup against the group's reference
variant and a noisy flag per figure. Markdown, HTML, CSV and JSON all render this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from bench.catalogue import METRICS, coverage_too_low, interval, interval_coverage, point, sample_count
from bench.metrics.drift_config import DEFAULT_PROTOCOL

# A figure whose 95% interval is wider than this fraction of its value is marked noisy:
# with the 5-20 repetitions a cell takes, a clean machine gives a few percent; more
# means something else ran, or the budget was too short to average it out.
NOISY_REL_CI = 0.10

REFERENCE_VARIANT = "fp32"

# Columns of the comparison table, in order (catalogue keys).
COLUMNS = ["ttft_ms", "tpot_ms", "e2e_ms", "decode_tokens_per_s", "prefill_tokens_per_s", "roofline_fraction",
           "prefill_flops_fraction",
           "peak_memory_bytes", "serving_peak_memory_bytes", "weights_bytes",
           "ppl_ratio", "kld_mean", "top1_agreement", "gen_exact_match",
           "gen_common_prefix_mean"]


@dataclass(frozen=True)
class Figure:
    """One metric of one cell: point value, 95% interval, repetitions and the noisy flag."""

    key: str
    value: float | None
    ci: tuple[float, float] | None = None
    n: int | None = None
    coverage: float | None = None  # the interval's true coverage, when recorded (0.9375 at n = 5)

    @property
    def rel_ci_width(self) -> float | None:
        if self.value is None or self.ci is None or self.value == 0:
            return None
        return (self.ci[1] - self.ci[0]) / abs(self.value)

    @property
    def too_few_repetitions(self) -> bool:
        """The interval rests on too few repetitions to say anything (of 1 repetition it has no width)."""
        return self.value is not None and coverage_too_low(self.coverage)

    @property
    def noisy(self) -> bool:
        # Drift intervals come from standard errors over thousands of tokens: not run noise.
        if METRICS[self.key].kind == "drift":
            return False
        if self.too_few_repetitions:
            return True
        width = self.rel_ci_width
        return width is not None and width > NOISY_REL_CI

    def text(self, with_ci: bool = True) -> str:
        m = METRICS[self.key]
        s = m.format(self.value)
        if with_ci and self.ci and self.value is not None and m.kind != "drift":
            s += f" [{m.format(self.ci[0])}, {m.format(self.ci[1])}]"
        return s + (" ~" if self.noisy else "")


@dataclass
class Row:
    record: dict[str, Any]
    figures: dict[str, Figure]
    speedup: tuple[float, float, float] | None = None  # (ratio, low, high) of reference / variant latency
    speedup_noisy: bool = False  # marked as a figure is: interval wider than NOISY_REL_CI, or too few repetitions

    @property
    def variant(self) -> str:
        return self.record["variant"]

    @property
    def status(self) -> str:
        return self.record["status"]

    def drift_text(self) -> str:
        r = self.record
        if "drift_ok" not in r:
            return "-"
        return "ok" if r["drift_ok"] else "over budget" if r.get("drift_violations") else "drift failed"


@dataclass
class Group:
    model: str
    device: str
    scenario: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    reference: str | None = None
    speedup_metric: str = "e2e_ms"

    @property
    def key(self) -> tuple:
        s = self.scenario
        return (self.model, self.device, s["name"], s["batch_size"], s["prompt_tokens"], s["new_tokens"])

    @property
    def title(self) -> str:
        s = self.scenario
        return (f"{self.model} on {self.device}: {s['name']}, batch {s['batch_size']}, prompt {s['prompt_tokens']}, "
                f"new {s['new_tokens']}")

    @property
    def slug(self) -> str:
        s = self.scenario
        model = re.sub(r"[^A-Za-z0-9._]+", "-", self.model).strip("-.") or "model"
        return f"{model}-{self.device}-{s['name']}-b{s['batch_size']}-p{s['prompt_tokens']}-n{s['new_tokens']}"

    def records(self) -> list[dict[str, Any]]:
        return [r.record for r in self.rows]


def figure(record: dict[str, Any], key: str) -> Figure:
    return Figure(key, point(record, key), interval(record, key), sample_count(record, key),
                  interval_coverage(record, key))


def cpu_text(env: dict[str, Any]) -> str:
    """The CPU and RAM of a run's environment; '?' for a figure it did not record."""
    cores = env.get("cpu_logical_cores") or "?"
    ram = env.get("ram_bytes")
    return (f"{env.get('cpu_model') or '?'} ({cores} logical cores), "
            + (f"RAM {ram / 2**30:.1f} GiB" if ram else "RAM ?"))


def gpus_text(env: dict[str, Any]) -> str:
    """The GPUs of a run's environment; an empty list only reads "none" when NVML answered or no driver exists."""
    names = ", ".join(g.get("name", "?") for g in env.get("gpus", []))
    source = env.get("gpus_source") or "nvml"
    if names or source == "nvml":
        return names or "none"
    return f"none ({source})" if source.startswith("no NVIDIA driver") else f"unknown ({source})"


def scenario_key(record: dict[str, Any]) -> tuple:
    s = record["scenario"]
    return (record["model"], record["device"], s["name"], s["batch_size"], s["prompt_tokens"], s["new_tokens"])


def group_records(records: list[dict[str, Any]]) -> list[Group]:
    """Records grouped by model, device and scenario, in first-seen order, with figures and speedups."""
    groups: dict[tuple, Group] = {}
    for r in records:
        k = scenario_key(r)
        if k not in groups:
            groups[k] = Group(r["model"], r["device"], dict(r["scenario"]))
        groups[k].rows.append(Row(r, {c: figure(r, c) for c in COLUMNS}))
    for g in groups.values():
        _add_speedups(g)
    return list(groups.values())


def speedup_basis(group: Group) -> str:
    """What the group's speedups divide, raw text: the reference's p50 latency over each variant's."""
    if not group.reference:
        return "none: no ok reference variant in this group (fp32, or a variant whose recipe has no steps)."
    return f"{group.reference} p50 {group.speedup_metric} / the variant's, with a bootstrap 95% interval."


def _reference_row(group: Group) -> Row | None:
    ok = [row for row in group.rows if row.status == "ok"]
    for row in ok:
        if row.variant == REFERENCE_VARIANT:
            return row
    return next((row for row in ok if not row.record.get("recipe", {}).get("steps")), None)


def _add_speedups(group: Group) -> None:
    """Speedup = reference p50 latency / variant p50 latency (e2e; TTFT for prefill), with a bootstrap 95% CI."""
    group.speedup_metric = "ttft_ms" if group.scenario["name"] == "prefill" else "e2e_ms"
    ref = _reference_row(group)
    if ref is None:
        return
    group.reference = ref.variant
    key = group.speedup_metric
    ref_samples = (ref.record.get("samples") or {}).get(key)
    ref_p50 = point(ref.record, key)
    for row in group.rows:
        value = point(row.record, key)
        if row.status != "ok" or value is None or ref_p50 is None or value <= 0:
            continue
        samples = (row.record.get("samples") or {}).get(key)
        low, high = speedup_interval(ref_samples, samples, ref.record, row.record, key)
        row.speedup = (ref_p50 / value, low, high)
        row.speedup_noisy = row is not ref and speedup_noisy(row.speedup, ref.figures[key], row.figures[key])


def speedup_noisy(speedup: tuple[float, float, float], ref: Figure, var: Figure) -> bool:
    """The rule a figure is marked by, for a ratio of two: either side rests on too few repetitions, or the
    ratio's interval is wider than ``NOISY_REL_CI`` of it. A ratio without an interval is judged on the first.
    """
    ratio, low, high = speedup
    if ref.too_few_repetitions or var.too_few_repetitions:
        return True
    return math.isfinite(low) and math.isfinite(high) and ratio > 0 and (high - low) / ratio > NOISY_REL_CI


def speedup_interval(ref_samples, var_samples, ref_record, var_record, key) -> tuple[float, float]:
    """95% interval of the ratio of medians: percentile bootstrap on the raw samples when both sides have
    at least 3, else the ratio of the medians' interval ends (wider, never narrower).
    """
    import numpy as np

    if ref_record is var_record:
        return 1.0, 1.0
    if _numbers(ref_samples) and _numbers(var_samples) and min(len(ref_samples), len(var_samples)) >= 3:
        from scipy.stats import bootstrap

        res = bootstrap((np.asarray(ref_samples, float), np.asarray(var_samples, float)),
                        lambda a, b, axis: np.median(a, axis=axis) / np.median(b, axis=axis),
                        n_resamples=2000, method="percentile", vectorized=True, paired=False,
                        rng=np.random.default_rng(0))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    ref_ci, var_ci = interval(ref_record, key), interval(var_record, key)
    if ref_ci and var_ci and var_ci[0] > 0:
        return ref_ci[0] / var_ci[1], ref_ci[1] / var_ci[0]
    return math.nan, math.nan


def _numbers(values) -> bool:
    """A list of finite numbers (a hand-edited record can hold NaN, which would turn the bootstrap into NaN)."""
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) for v in values)


def speedup_parts(row: Row) -> tuple[str, str]:
    """The speedup as (ratio, interval) texts: ("1.21x", "[1.18, 1.24]"), ("1.00x", "(ref)"), ("1.25x", "")."""
    if row.speedup is None:
        return "-", ""
    ratio, low, high = row.speedup
    if math.isnan(low):
        return f"{ratio:.2f}x", ""
    if low == high == 1.0:
        return "1.00x", "(ref)"
    return f"{ratio:.2f}x", f"[{low:.2f}, {high:.2f}]"


def speedup_text(row: Row) -> str:
    """'1.21x [1.18, 1.24]', with ' ~' where it is noisy, as a figure's text is."""
    main, ci = speedup_parts(row)
    return main + (f" {ci}" if ci else "") + (" ~" if row.speedup_noisy else "")


def sweeps(records: list[dict[str, Any]]) -> dict[str, dict[tuple, list[tuple[int, dict[str, Any]]]]]:
    """Series over swept scenario axes: {"batch_size": {(model, device, name, variant, p, n): [(b, rec)]},
    "prompt_tokens": {(model, device, name, variant, b, n): [(p, rec)]}}; only series with 2+ points.
    """
    out: dict[str, dict[tuple, list]] = {"batch_size": {}, "prompt_tokens": {}}
    for r in records:
        if r["status"] != "ok":
            continue
        s = r["scenario"]
        out["batch_size"].setdefault((r["model"], r["device"], s["name"], r["variant"], s["prompt_tokens"],
                                      s["new_tokens"]), []).append((s["batch_size"], r))
        out["prompt_tokens"].setdefault((r["model"], r["device"], s["name"], r["variant"], s["batch_size"],
                                         s["new_tokens"]), []).append((s["prompt_tokens"], r))
    return {axis: {k: sorted(v, key=lambda x: x[0]) for k, v in series.items() if len({x for x, _ in v}) > 1}
            for axis, series in out.items()}


def drift_on_random_weights(record: dict[str, Any]) -> bool:
    """True when the record's drift was scored against a reference with random weights (a ``synthetic:``
    model): its figures check the mechanics, not accuracy. The cell stores the flag among its metrics.
    """
    return (record.get("metrics") or {}).get("drift_meaningful") is False


def drift_protocol_name(record: dict[str, Any]) -> str | None:
    """The drift protocol a record's figures were scored under; None without drift.

    Records written before the protocol could be chosen name none and are ``all-but-first``.
    """
    drift = (record.get("method") or {}).get("drift") or {}
    return drift.get("protocol_name", DEFAULT_PROTOCOL) if drift.get("protocol") else None
