"""The report's figures, drawn with matplotlib (Agg) and returned as inline SVG or PNG bytes.

Every figure takes a ``Group`` (one model, device and scenario) or sweep series and draws
only what the records hold; a figure with nothing to draw returns None.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

from bench.catalogue import interval, metric, point
from bench.report.table import Group
from bench.select import DRIFT_AXIS, decide, default_objective

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
WIDTH_IN = 7.5


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "infermatrix", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.titlesize": 10, "axes.titleweight": "bold"})
    return plt


def text(s: Any) -> str:
    """A label matplotlib draws literally ('$' would start mathtext)."""
    return str(s).replace("$", r"\$")


def svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prolog), and close it."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    out = buf.getvalue()
    out = out[out.index("<svg"):]
    # The RDF metadata block names vocabularies by URL; a report that fetches nothing should not carry them.
    return re.sub(r"<metadata>.*?</metadata>\s*", "", out, flags=re.S)


def png(fig, dpi: int = 150) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def _ok(group: Group) -> list[dict[str, Any]]:
    return [r for r in group.records() if r["status"] == "ok"]


def _colors(group: Group) -> dict[str, str]:
    return {row.variant: PALETTE[i % len(PALETTE)] for i, row in enumerate(group.rows)}


def _err(records, key):
    """Asymmetric error bars (2, N) from each record's interval; zero where there is none."""
    lo, hi = [], []
    for r in records:
        v, ci = point(r, key), interval(r, key)
        lo.append(max(v - ci[0], 0) if ci and v is not None else 0)
        hi.append(max(ci[1] - v, 0) if ci and v is not None else 0)
    return [lo, hi]


# Where a point's label may go, in points from the point, tried in order: right above, right below,
# left above, left below, then further up and down.
LABEL_OFFSETS = ((7, 5), (7, -13), (-7, 5), (-7, -13), (7, 15), (7, -23))


def place_labels(fig, ax, labels: list[tuple[str, tuple[float, float]]], marker_pt: float) -> None:
    """Annotate each (label, data point) at the first offset where it covers no earlier label and no marker.

    Greedy, in the given order; a label that fits nowhere goes to the first offset. The axis
    limits must be final (scales and margins set) before this is called.
    """
    ax.autoscale_view()
    renderer = fig.canvas.get_renderer()
    pad = marker_pt / 2 * fig.dpi / 72  # marker radius in pixels
    markers = [ax.transData.transform(xy) for _, xy in labels]
    placed = []

    def annotate(label, xy, dx, dy):
        ann = ax.annotate(label, xy, xytext=(dx, dy), textcoords="offset points", fontsize=8,
                          ha="left" if dx > 0 else "right")
        return ann, ann.get_window_extent(renderer)

    for label, xy in labels:
        for dx, dy in LABEL_OFFSETS:
            ann, box = annotate(label, xy, dx, dy)
            if not any(box.overlaps(b) for b in placed) and not any(
                    box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad for mx, my in markers):
                break
            ann.remove()
        else:
            ann, box = annotate(label, xy, *LABEL_OFFSETS[0])
        placed.append(box)


def speed_vs_drift(group: Group):
    """The group's objective (decode tokens/s; prefill tokens/s for a prefill sweep), p50 with 95% CI, against
    mean KLD on a log axis, the Pareto front drawn: the axes ``select`` and the reports' recommendation use.

    Variants with KLD exactly 0 (lossless) are drawn at a floor a decade below the smallest
    positive KLD, marked with a hollow symbol and labelled "KLD 0".
    """
    speed = default_objective(group)
    recs = [r for r in _ok(group) if point(r, DRIFT_AXIS) is not None and point(r, speed.key) is not None]
    if not recs:
        return None
    plt = _plt()
    positive = [point(r, DRIFT_AXIS) for r in recs if point(r, DRIFT_AXIS) > 0]
    floor = (min(positive) if positive else 1e-6) / 10
    colors = _colors(group)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.6))

    def x_of(r):
        return max(point(r, DRIFT_AXIS), floor)

    front = set(decide(group, speed, []).front)
    front_recs = sorted((r for r in recs if r["variant"] in front), key=x_of)
    if len(front_recs) > 1:
        ax.plot([x_of(r) for r in front_recs], [point(r, speed.key) for r in front_recs], "--", color="#444",
                lw=1.2, zorder=1, label="Pareto front")
    for r in recs:
        zero = point(r, DRIFT_AXIS) == 0
        y = point(r, speed.key)
        yerr = _err([r], speed.key)
        ax.errorbar([x_of(r)], [y], yerr=yerr, fmt="o", ms=8, capsize=3, zorder=3,
                    color=colors[r["variant"]], mfc="white" if zero else colors[r["variant"]], mew=2)
    ax.set_xscale("log")
    _decade_ticks(ax.xaxis)
    ax.set_xlabel("KLD mean vs fp32 reference, nats/token (log; lower is better)")
    ax.set_ylabel(f"{speed.label} (p50, 95% CI)")
    ax.set_title(text(f"Speed against drift ({group.model}, {group.device}, {group.scenario['name']})"), loc="left")
    ax.margins(x=0.25, y=0.15)
    place_labels(fig, ax, [(text(r["variant"]) + (" (KLD 0)" if point(r, DRIFT_AXIS) == 0 else "")
                            + (" *" if r["variant"] in front else ""), (x_of(r), point(r, speed.key)))
                           for r in recs], marker_pt=8)
    if len(front_recs) > 1:
        ax.legend(loc="lower left", frameon=False)
    fig.text(0.01, -0.02, "* on the Pareto front (no other variant is at least as fast and as accurate, "
             "within noise)", fontsize=7, color="#555")
    return fig


def _decade_ticks(axis) -> None:
    """Log-axis labels that never run into each other: minor ticks at 2 and 5 times each power of ten,
    labelled only where the axis spans under two decades (matplotlib's default labels every minor
    tick of a short axis: over 1.3 decades its 3e-9 and 4e-9 overlapped).
    """
    from matplotlib import ticker

    axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 2)))


def throughput_bars(group: Group):
    """Decode tokens/s with 95% CI error bars, and the roofline fraction (bandwidth achieved / measured peak)."""
    recs = [r for r in _ok(group) if point(r, "decode_tokens_per_s") is not None]
    if not recs:
        return None
    plt = _plt()
    names = [text(r["variant"]) for r in recs]
    colors = [_colors(group)[r["variant"]] for r in recs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(WIDTH_IN, 0.32 * len(recs) + 1.2), sharey=True,
                               gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(recs)))
    a.barh(y, [point(r, "decode_tokens_per_s") for r in recs], xerr=_err(recs, "decode_tokens_per_s"),
           color=colors, capsize=3, error_kw={"lw": 1})
    a.set_yticks(y, names)
    a.invert_yaxis()
    a.set_xlabel("decode tokens/s (p50, 95% CI)")
    a.set_title("Decode throughput", loc="left")
    roof = [point(r, "roofline_fraction") for r in recs]
    b.barh(y, [v if v is not None else 0 for v in roof], color=colors, alpha=0.8)
    b.set_xlabel("fraction of measured copy bandwidth")
    b.set_title("Roofline", loc="left")
    b.set_xlim(0, max(1.0, max((v or 0) for v in roof) * 1.1))
    for i, v in enumerate(roof):
        b.text((v or 0) + 0.01, i, f"{v:.2f}" if v is not None else "n/a", va="center", fontsize=8)
    return fig


MEMORY_BARS = (("peak_memory_bytes", "#4c72b0", ".0f"), ("serving_peak_memory_bytes", "#55a868", ".0f"),
               ("weights_bytes", "#dd8452", ".1f"))


def memory_bars(group: Group):
    """Peak memory (whole cell, load included), serving peak and weights size per variant, MiB.

    A series none of the variants has (serving peaks of older records) is left out.
    """
    recs = [r for r in _ok(group) if any(point(r, key) is not None for key, _, _ in MEMORY_BARS)]
    if not recs:
        return None
    series = [(key, colour, fmt, [point(r, key) for r in recs]) for key, colour, fmt in MEMORY_BARS]
    series = [s for s in series if any(v is not None for v in s[3])]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.18 * len(series) * len(recs) + 1.2))
    height = 0.8 / len(series)
    for j, (key, colour, fmt, values) in enumerate(series):
        mib = [(v or 0) / 2**20 for v in values]
        offsets = [i - 0.4 + height * (j + 0.5) for i in range(len(recs))]
        ax.barh(offsets, mib, height=height, color=colour, label=metric(key).label)
        for at, v, shown in zip(offsets, mib, values, strict=True):
            ax.text(v, at, f" {v:{fmt}}" if shown is not None else " n/a", va="center", fontsize=7)
    ax.set_yticks(range(len(recs)), [text(r["variant"]) for r in recs])
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("Memory and size", loc="left")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(series))
    return fig


def latency_distributions(group: Group):
    """TTFT and TPOT per repetition (raw samples): box plots with every sample drawn."""
    keys = [k for k in ("ttft_ms", "tpot_ms") if any(_samples(r, k) for r in _ok(group))]
    if not keys:
        return None
    plt = _plt()
    recs = [r for r in _ok(group) if any(_samples(r, k) for k in keys)]
    fig, axes = plt.subplots(1, len(keys), figsize=(WIDTH_IN, 0.36 * len(recs) + 1.2), sharey=True, squeeze=False)
    colors = _colors(group)
    for ax, key in zip(axes[0], keys, strict=True):
        data = [_samples(r, key) or [math.nan] for r in recs]
        ax.boxplot(data, orientation="horizontal", widths=0.5, showfliers=False,
                   medianprops={"color": "black"}, boxprops={"color": "#555"})
        for i, (r, vals) in enumerate(zip(recs, data, strict=True)):
            jitter = [i + 1 + 0.15 * ((j % 5) - 2) / 2 for j in range(len(vals))]
            ax.scatter(vals, jitter, s=10, color=colors[r["variant"]], alpha=0.8, zorder=3)
        ax.set_yticks(range(1, len(recs) + 1), [text(r["variant"]) for r in recs])
        ax.set_xlabel(f"{metric(key).label} (each repetition)")
        ax.set_title(f"{key.split('_')[0].upper()} distribution", loc="left")
    axes[0][0].invert_yaxis()
    return fig


def _samples(record, key) -> list[float]:
    vals = (record.get("samples") or {}).get(key)
    return [float(v) for v in vals if isinstance(v, (int, float))] if isinstance(vals, list) else []


def sweep_plot(series: dict[tuple, list[tuple[int, dict[str, Any]]]], axis: str):
    """tokens/s against batch size, or TTFT against prompt length, one line per variant with CI bars."""
    axes = {"batch_size": ("decode_tokens_per_s", "batch size", "Decode throughput against batch size"),
            "prompt_tokens": ("ttft_ms", "prompt tokens", "TTFT against prompt length")}
    if axis not in axes:
        raise ValueError(f"sweep_plot: no swept axis {axis!r} (batch_size or prompt_tokens)")
    if not series:
        return None
    plt = _plt()
    key, xlabel, title = axes[axis]
    if axis == "batch_size" and not any(point(r, key) for pts in series.values() for _, r in pts):
        key, title = "prefill_tokens_per_s", "Prefill throughput against batch size"  # a prefill sweep
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0))
    for i, (k, pts) in enumerate(series.items()):
        pts = [(x, r) for x, r in pts if point(r, key) is not None]
        if not pts:
            continue
        model, device, name, variant = k[:4]
        ax.errorbar([x for x, _ in pts], [point(r, key) for _, r in pts], yerr=_err([r for _, r in pts], key),
                    marker="o", capsize=3, color=PALETTE[i % len(PALETTE)],
                    label=text(f"{variant} ({device}, {name})"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric(key).label} (p50, 95% CI)")
    ax.set_title(title, loc="left")
    ax.legend(frameon=False, fontsize=8)
    return fig
