"""The report's figures draw what the records hold: each mark's position read back off the matplotlib
figure (points, bars, error bars, samples, labels, axes), against the hand-made records' known figures.
"""

from __future__ import annotations

import pytest

from bench.report import plots
from bench.report.table import group_records, sweeps
from tests.bench.records import record


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots._plt().close("all")


def _group(*records):
    (group,) = group_records(list(records))
    return group


@pytest.fixture
def group():
    return _group(record("fp32", decode=100, kld=0.0, steps=0, roofline_fraction=0.42),
                  record("q8", decode=180, noise=0.2, kld=0.002),
                  record("q4", decode=150, kld=0.3, roofline_fraction=None),
                  record("broken", status="failed", error="boom"))


def _errorbar_points(ax):
    """(x, y, y_low, y_high, marker face colour) of each errorbar container, in drawing order."""
    out = []
    for c in ax.containers:
        line, _, (bars,) = c.lines
        (x,), (y,) = line.get_xdata(), line.get_ydata()
        ((_, lo), (_, hi)) = bars.get_segments()[0]
        out.append((x, y, lo[1] if hasattr(lo, "__len__") else lo, hi[1] if hasattr(hi, "__len__") else hi,
                    line.get_markerfacecolor()))
    return out


def test_speed_against_drift_places_each_variant_at_its_kld_and_speed_with_its_interval(group):
    fig = plots.speed_vs_drift(group)
    ax = fig.axes[0]
    points = _errorbar_points(ax)
    floor = 0.002 / 10  # KLD 0 is drawn a decade below the smallest positive KLD
    assert [(x, y) for x, y, *_ in points] == [(floor, 100.0), (0.002, 180.0), (0.3, 150.0)]
    assert [(lo, hi) for _, _, lo, hi, _ in points] == [(98.0, 102.0), (144.0, 216.0), (147.0, 153.0)]
    faces = [face for *_, face in points]
    assert faces[0] == "white" and faces[1] == plots.PALETTE[1] and faces[2] == plots.PALETTE[2]  # lossless: hollow
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "decode tok/s (p50, 95% CI)"
    assert ax.get_xlabel() == "KLD mean vs fp32 reference, nats/token (log; lower is better)"
    assert ax.get_title(loc="left") == "Speed against drift (tiny, cpu, generate)"
    (front,) = [line for line in ax.lines if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [floor, 0.002] and list(front.get_ydata()) == [100.0, 180.0]
    assert front.get_linestyle() == "--"
    assert [t.get_text() for t in ax.texts] == ["fp32 (KLD 0) *", "q8 *", "q4"]
    assert [t.xy for t in ax.texts] == [(floor, 100.0), (0.002, 180.0), (0.3, 150.0)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Pareto front"]


def test_speed_against_drift_of_lossless_variants_only_and_of_no_drift():
    lossless = _group(record("fp32", decode=100, kld=0.0, steps=0), record("onnx", decode=200, kld=0.0))
    ax = plots.speed_vs_drift(lossless).axes[0]
    assert [x for x, *_ in _errorbar_points(ax)] == [1e-7, 1e-7]  # 1e-6 / 10 when no KLD is positive
    assert [t.get_text() for t in ax.texts] == ["fp32 (KLD 0)", "onnx (KLD 0) *"]
    assert ax.get_legend() is None  # a front of one variant draws no line
    assert plots.speed_vs_drift(_group(record("fp32", kld=None), record("q8", kld=None))) is None


def test_throughput_bars_draw_each_rate_with_its_interval_and_the_roofline_fraction(group):
    fig = plots.throughput_bars(group)
    rates, roof = fig.axes
    (bars,) = [c for c in rates.containers if hasattr(c, "patches")]
    assert [p.get_width() for p in bars.patches] == [100.0, 180.0, 150.0]
    assert [t.get_text() for t in rates.get_yticklabels()] == ["fp32", "q8", "q4"]
    assert rates.yaxis_inverted()  # the first variant on top, as in the table
    (err,) = [c for c in rates.collections]
    assert [tuple(seg[:, 0]) for seg in err.get_segments()] == [(98.0, 102.0), (144.0, 216.0), (147.0, 153.0)]
    assert [p.get_width() for p in roof.patches] == [0.42, 0.3, 0]
    assert [t.get_text() for t in roof.texts] == ["0.42", "0.30", "n/a"]
    assert roof.get_xlim() == (0, 1.0) and roof.get_xlabel() == "fraction of measured copy bandwidth"
    above = _group(record("onnx", decode=100, roofline_fraction=1.5))
    assert plots.throughput_bars(above).axes[1].get_xlim() == pytest.approx((0, 1.65))
    assert plots.throughput_bars(_group(record("x", decode=None))) is None


def test_memory_bars_draw_each_series_in_mib_and_leave_out_one_no_variant_has(group):
    fig = plots.memory_bars(group)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["peak MiB", "weights MiB"]  # no serving peak
    peak, weights = [c for c in ax.containers]
    assert [p.get_width() for p in peak.patches] == [400.0] * 3
    assert [p.get_width() for p in weights.patches] == [40.0] * 3
    assert [round(p.get_y() + p.get_height() / 2, 3) for p in peak.patches] == [-0.2, 0.8, 1.8]
    assert [round(p.get_y() + p.get_height() / 2, 3) for p in weights.patches] == [0.2, 1.2, 2.2]
    assert [t.get_text() for t in ax.texts] == [" 400"] * 3 + [" 40.0"] * 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fp32", "q8", "q4"] and ax.get_xlabel() == "MiB"
    serving = _group(record("a", serving_peak_memory_bytes=300 * 2**20), record("b"))
    ax = plots.memory_bars(serving).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["peak MiB", "serving peak MiB", "weights MiB"]
    assert [t.get_text() for t in ax.texts][2:4] == [" 300", " n/a"]


def test_latency_distributions_draw_every_repetition(group):
    fig = plots.latency_distributions(group)
    ttft, tpot = fig.axes
    assert ttft.get_title(loc="left") == "TTFT distribution" and tpot.get_title(loc="left") == "TPOT distribution"
    assert [t.get_text() for t in ttft.get_yticklabels()] == ["fp32", "q8", "q4"]
    for ax, key in ((ttft, "ttft_ms"), (tpot, "tpot_ms")):
        drawn = [sorted(c.get_offsets()[:, 0]) for c in ax.collections]
        assert drawn == [pytest.approx(sorted(r["samples"][key])) for r in group.records() if r["status"] == "ok"]
        rows = [set(c.get_offsets()[:, 1].round(6)) for c in ax.collections]
        assert all(min(r) >= i + 1 - 0.15 and max(r) <= i + 1 + 0.15 for i, r in enumerate(rows))  # its own row
    assert tpot.get_xlabel() == "TPOT ms (each repetition)"
    assert plots.latency_distributions(_group(record("x", decode=None))) is None


def test_sweep_plots_draw_each_variant_along_its_axis():
    decode = {"name": "decode", "prompt_tokens": 64, "new_tokens": 16}
    records = [record(v, decode=rate * b, scenario={**decode, "batch_size": b})
               for v, rate in (("fp32", 100), ("q8", 150)) for b in (4, 1, 2)]
    fig = plots.sweep_plot(sweeps(records)["batch_size"], "batch_size")
    ax = fig.axes[0]
    lines = [c.lines[0] for c in ax.containers]
    assert [list(line.get_xdata()) for line in lines] == [[1, 2, 4]] * 2
    assert [list(line.get_ydata()) for line in lines] == [[100.0, 200.0, 400.0], [150.0, 300.0, 450.0 + 150.0]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fp32 (cpu, decode)", "q8 (cpu, decode)"]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "batch size"
    assert ax.get_ylabel() == "decode tok/s (p50, 95% CI)"
    assert ax.get_title(loc="left") == "Decode throughput against batch size"
    assert plots.sweep_plot({}, "batch_size") is None
    with pytest.raises(ValueError, match="no swept axis 'new_tokens'"):
        plots.sweep_plot({}, "new_tokens")


def test_a_prefill_batch_sweep_is_titled_by_what_it_draws():
    prefill = {"name": "prefill", "prompt_tokens": 256, "new_tokens": 1}
    records = [record("fp32", decode=None, scenario={**prefill, "batch_size": b}, prefill_tokens_per_s=1000.0 * b)
               for b in (1, 2)]
    ax = plots.sweep_plot(sweeps(records)["batch_size"], "batch_size").axes[0]
    assert list(ax.containers[0].lines[0].get_ydata()) == [1000.0, 2000.0]
    assert ax.get_ylabel() == "prefill tok/s (p50, 95% CI)"
    assert ax.get_title(loc="left") == "Prefill throughput against batch size"


def test_a_prompt_sweep_draws_ttft_against_prompt_length():
    records = [record("fp32", scenario={"name": "decode", "batch_size": 1, "prompt_tokens": p, "new_tokens": 8},
                      ttft_ms={"p50": p / 10, "ci95_p50": [p / 11, p / 9]}) for p in (128, 64)]
    ax = plots.sweep_plot(sweeps(records)["prompt_tokens"], "prompt_tokens").axes[0]
    line, _, (bars,) = ax.containers[0].lines
    assert list(line.get_xdata()) == [64, 128] and list(line.get_ydata()) == [6.4, 12.8]
    assert [tuple(seg[:, 1]) for seg in bars.get_segments()] == [pytest.approx((64 / 11, 64 / 9)),
                                                                pytest.approx((128 / 11, 128 / 9))]
    assert ax.get_xlabel() == "prompt tokens" and ax.get_title(loc="left") == "TTFT against prompt length"


def test_labels_that_would_start_mathtext_are_drawn_literally():
    g = _group(record("$x$", decode=100, kld=0.01), record("fp32", decode=90, kld=0.0, steps=0))
    ax = plots.throughput_bars(g).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [r"\$x\$", "fp32"]  # rows in the records' order
    assert plots.text("a$b") == r"a\$b"


@pytest.mark.parametrize("klds", [(0.0, 3.9e-8), (0.0, 2e-3), (1e-8, 0.3), (0.0, 1.2e-4, 5.4e-3, 9.6e-3, 0.27)])
def test_the_drift_axis_tick_labels_never_overlap(klds):
    """Seen: over 1.3 decades (a lossless variant and KLD 3.9e-8) the 3e-9 and 4e-9 labels ran into each other."""
    fig = plots.speed_vs_drift(_group(*(record(f"v{i}", decode=100 + 10 * i, kld=k) for i, k in enumerate(klds))))
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = sorted((label.get_window_extent(renderer) for label in ax.xaxis.get_ticklabels(which="both")
                    if label.get_visible() and label.get_text()
                    and ax.get_xlim()[0] <= label.get_position()[0] <= ax.get_xlim()[1]), key=lambda b: b.x0)
    assert boxes  # the axis is labelled
    for left, right in zip(boxes, boxes[1:], strict=False):
        assert left.x1 < right.x0, f"tick labels overlap: {left} {right}"
