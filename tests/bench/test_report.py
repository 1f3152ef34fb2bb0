"""Markdown, CSV and JSON reports of hand-made runs: tables, intervals, noise marks, escaping."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from bench.cli import main
from bench.report.table import NOISY_REL_CI
from bench.report.write import render
from tests.bench.records import record, write_run

EVIL = "<script>alert(1)</script>"


@pytest.fixture
def run(tmp_path):
    sweep = {"name": "decode", "prompt_tokens": 64, "new_tokens": 16}
    return write_run(tmp_path / "run", [
        record("fp32", decode=100, kld=0.0, steps=0),
        record("q8", decode=180, noise=0.2, kld=0.002),
        record("q4|odd", decode=150, kld=0.05),
        record("broken", status="failed", error="Traceback (most recent call last):\nRuntimeError: kaput"),
        record("cuda-only", status="skipped", error="needs CUDA"),
        record("fp32", model=EVIL, decode=50, kld=0.0, steps=0),
        *[record("fp32", decode=100 * b, scenario={**sweep, "batch_size": b}, steps=0) for b in (1, 2, 4)],
    ])


def test_markdown_has_a_table_per_scenario_with_intervals_speedups_and_noise_marks(run):
    text = render(run, "md")
    assert text.count("\n## ") >= 4  # three scenario groups + how to read
    q8 = next(line for line in text.splitlines() if line.startswith("| q8 |"))
    cells = [c.strip() for c in q8.strip("|").split("|")]
    assert cells[2].startswith("5.56 [") and cells[2].endswith("~")  # TPOT p50 [CI], noisy at +-20%
    assert cells[3] == "5"  # n
    assert cells[4].startswith("1.") and "[" in cells[4]  # speedup vs fp32 with its interval
    assert cells[5].startswith("180.0 [")
    fp32 = next(line for line in text.splitlines() if line.startswith("| fp32 |"))
    assert "1.00x (ref)" in fp32 and "~" not in fp32  # +-2% spread is under the threshold
    assert NOISY_REL_CI == 0.10 and "wider than 10% of its value" in text
    assert "| q4\\|odd |" in text  # a pipe in a name cannot break the table
    assert "**recommended: q8**" in text and "Pareto front (decode tok/s against KLD): fp32, q8" in text
    assert "broken / cpu: failed: RuntimeError: kaput\n" in text and "needs CUDA" in text  # the cause, not line 1
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_a_prefill_sweep_table_shows_its_figures_and_drops_the_columns_no_row_has(tmp_path):
    from bench.stats import summarize

    def prefill(variant, ttft, frac):
        return record(variant, decode=None, kld=None, steps=0,
                      scenario={"name": "prefill", "batch_size": 1, "prompt_tokens": 256, "new_tokens": 1},
                      ttft_ms=summarize([ttft] * 5), prefill_tokens_per_s=256 / ttft * 1e3, prefill_flops_fraction=frac)

    run_dir = write_run(tmp_path / "run", [prefill("fp32", 40.0, 0.61), prefill("bf16", 20.0, 0.45),
                                           record("fp32", decode=100, kld=0.0, steps=0)])
    lines = render(run_dir, "md").splitlines()
    head_prefill, head_generate = [line for line in lines if line.startswith("| variant |")]
    assert "prefill FLOP frac" in head_prefill and "TTFT p50" in head_prefill and "prefill tok/s" in head_prefill
    for column in ("TPOT", "decode tok/s", "roofline", "ppl ratio", "KLD"):  # no row of the sweep has them
        assert column not in head_prefill.replace("prefill FLOP frac", "")
    assert head_prefill.count("|") == lines[lines.index(head_prefill) + 2].count("|")  # rows match the header
    assert "| fp32 |" in lines[lines.index(head_prefill) + 2] + lines[lines.index(head_prefill) + 3]
    assert "0.61" in "".join(lines) and "0.45" in "".join(lines)
    assert "TPOT" in head_generate and "KLD" in head_generate  # the generate table keeps its own
    html = render(run_dir, "html")
    prefill_table = html.split("<table")[1]  # groups in the Markdown's order
    assert "prefill FLOP frac" in prefill_table and "TPOT" not in prefill_table


def test_csv_has_one_row_per_cell_and_unit_named_columns(run):
    from bench.report.csv import csv_report
    from bench.results import read_records

    rows = list(csv.DictReader(io.StringIO(csv_report(read_records(run)))))
    assert len(rows) == 9
    header = rows[0].keys()
    for col in ("ttft_ms_p50", "ttft_ms_ci95_low", "ttft_ms_ci95_high", "ttft_ms_n", "decode_tokens_per_s",
                "peak_memory_bytes", "kld_mean", "speedup_vs_reference", "status", "error"):
        assert col in header
    q8 = next(r for r in rows if r["variant"] == "q8")
    assert float(q8["decode_tokens_per_s"]) == pytest.approx(180.0)
    assert float(q8["ttft_ms_ci95_low"]) < float(q8["ttft_ms_p50"]) < float(q8["ttft_ms_ci95_high"])
    broken = next(r for r in rows if r["variant"] == "broken")
    assert broken["status"] == "failed" and broken["error"] == "RuntimeError: kaput"
    assert broken["ttft_ms_p50"] == ""  # a failure is not a zero


def test_report_command_writes_each_format(run, tmp_path, capsys):
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.startswith("# infermatrix run `handmade`")
    out = tmp_path / "out"
    assert main(["report", str(run), "--format", "md,html,csv,json,png", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[:4] == ["report.html", "report.json", "report.md", "results.csv"]
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == 5 and all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
    data = json.loads((out / "report.json").read_text())
    first = data["groups"][0]
    assert first["reference"] == "fp32" and first["selection"]["chosen"] == "q8"
    assert first["rows"][1]["metrics"]["tpot_ms"]["noisy"] is True
    assert main(["report", str(run), "--format", "pdf"]) == 2
    assert "allowed formats are md, html, csv, json, png" in capsys.readouterr().err
    for text in ("md,,html", "md,", ",", " "):  # a stray comma or a format left out is never dropped in silence
        assert main(["report", str(run), "--format", text]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"--format {text!r}: allowed formats are md, html, csv, json, png (comma-separated)")
    # A format named twice is a typo, refused as in every other comma list.
    assert main(["report", str(run), "--format", "md,html,md", "--out", str(tmp_path / "twice")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--format names format 'md' twice in 'md,html,md'")
    assert not (tmp_path / "twice").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_png_of_a_run_without_drift_says_why_nothing_was_written(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record("fp32", kld=None, steps=0), record("q8", kld=None)])
    out = tmp_path / "out"
    assert main(["report", str(run), "--format", "png,md", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    captured = capsys.readouterr()
    assert captured.out == f"{out / 'report.md'}\n"
    assert captured.err.startswith("infermatrix report: no png written: the speed-against-drift figure needs ")


def test_a_run_without_records_says_so_in_every_report(tmp_path):
    from bench.report.markdown import NO_RECORDS

    run = write_run(tmp_path / "run", [])
    assert f"**{NO_RECORDS}**" in render(run, "md")
    assert f"<p><b>{NO_RECORDS}</b></p>" in render(run, "html")
    assert "No cell records" not in render(write_run(tmp_path / "other", [record("fp32")]), "md")


def test_html_escapes_input_and_fetches_nothing(run):
    page = render(run, "html")
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the report's own inline script
    # Nothing that loads: no src/href to another document, no CSS import or url(); SVG namespaces are names only.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:|data:text/html)""", page)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:|//)", page)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg",
                                                         "http://www.w3.org/1999/xlink"}
    assert page.count("<svg") >= 5 and page.count("<table class=\"sortable\">") == 5  # one per scenario group


@pytest.mark.parametrize(("env", "text"), [
    ({"gpus": [{"name": "NVIDIA H200"}], "gpus_source": "nvml"}, "NVIDIA H200"),
    ({"gpus": [], "gpus_source": "nvml"}, "none"),
    ({"gpus": [], "gpus_source": "no NVIDIA driver: NVML Shared Library Not Found"},
     "none (no NVIDIA driver: NVML Shared Library Not Found)"),
    ({"gpus": [], "gpus_source": "nvml failed: NVMLError_Unknown: Unknown Error"},
     "unknown (nvml failed: NVMLError_Unknown: Unknown Error)"),
    ({"gpus": []}, "none"),  # runs recorded before the source was kept
])
def test_gpu_line_never_says_none_when_nvml_failed(env, text):
    from bench.report.table import gpus_text

    assert gpus_text(env) == text


def _label_boxes(fig, ax):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in ax.texts]


def test_point_labels_keep_clear_of_each_other_and_of_the_markers():
    """Two variants almost on one spot (seen: prune-50's label drawn over prune-ffn-25's marker)."""
    from bench.report.plots import _plt, place_labels

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    # the default matrix's figure on a 2-core CPU: (KLD mean, decode tok/s), fp32 and no-kv-cache at the KLD floor
    points = [(4e-9, 187.0), (4e-9, 62.0), (1.3e-4, 204.0), (1.8e-2, 202.0), (2e-4, 76.0), (9.6e-3, 167.0),
              (9.8e-2, 161.0), (2.7e-1, 180.0), (4e-8, 307.0), (5.4e-3, 230.0)]
    ax.plot([x for x, _ in points], [y for _, y in points], "o", ms=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    place_labels(fig, ax, [(f"variant-{i}-label", xy) for i, xy in enumerate(points)], marker_pt=8)
    boxes = _label_boxes(fig, ax)
    assert [t.get_text() for t in ax.texts] == [f"variant-{i}-label" for i in range(len(points))]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    pad = 4 * fig.dpi / 72
    for mx, my in (ax.transData.transform(xy) for xy in points):
        assert not any(b.x0 - pad < mx < b.x1 + pad and b.y0 - pad < my < b.y1 + pad for b in boxes)
    plt.close(fig)


def test_a_label_with_no_free_place_is_still_drawn_beside_its_point():
    from bench.report.plots import LABEL_OFFSETS, _plt, place_labels

    plt = _plt()
    fig, ax = plt.subplots()
    ax.plot([1.0], [1.0], "o")
    place_labels(fig, ax, [(f"v{i}", (1.0, 1.0)) for i in range(len(LABEL_OFFSETS) + 2)], marker_pt=8)
    assert len(ax.texts) == len(LABEL_OFFSETS) + 2
    assert [t.xyann for t in ax.texts][-2:] == [LABEL_OFFSETS[0]] * 2  # the first place, when none is free
    plt.close(fig)


@pytest.mark.parametrize("fmt,name", [("md", "report.md"), ("csv", "results.csv")])
def test_the_committed_example_reports_are_what_this_version_renders(fmt, name):
    """reports/example is read as documentation: its reports must follow its records and today's code."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "reports" / "example"
    assert render(example, fmt) == (example / name).read_text(encoding="utf-8"), (
        "regenerate: infermatrix report reports/example --format md,html,csv,png --out reports/example")


def test_both_reports_say_what_the_roofline_columns_divide_by(run):
    md, html = render(run, "md"), render(run, "html")
    for text in (md, html):
        assert "How to read this" in text
        assert "over the copy bandwidth measured at the start of the run" in text
        assert "over the measured matmul rate of the dtype its recipe computes in (int8 for integer products)" in text
    assert "- `~` marks a noisy figure" in md and "<li>~ marks a noisy figure" in html


def test_speed_against_drift_plots_the_objective_its_group_is_chosen_on():
    from bench.report import plots
    from bench.report.table import group_records
    from bench.stats import summarize

    scenario = {"name": "prefill", "batch_size": 1, "prompt_tokens": 256, "new_tokens": 1}
    records = [record(v, decode=None, kld=kld, steps=0, scenario=scenario, prefill_tokens_per_s=rate,
                      prefill_tokens_per_s_summary=summarize([rate] * 5))
               for v, kld, rate in (("fp32", 0.0, 6000.0), ("bf16", 0.001, 9000.0))]
    (group,) = group_records(records)
    fig = plots.speed_vs_drift(group)  # a prefill sweep with drift: prefill tok/s, not an empty figure
    assert fig is not None and fig.axes[0].get_ylabel() == "prefill tok/s (p50, 95% CI)"
