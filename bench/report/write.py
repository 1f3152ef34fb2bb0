"""Render a run directory's reports in the requested formats."""

from __future__ import annotations

from pathlib import Path

from optimize.errors import InputError

FORMATS = {"md": "report.md", "html": "report.html", "csv": "results.csv", "json": "report.json",
           "png": "speed-vs-drift.png"}
RUN_END_FORMATS = ("md", "html", "csv")


def parse_formats(text: str) -> list[str]:
    """``"md,html"`` -> ``["md", "html"]``; unknown names raise InputError."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in FORMATS]
    if bad or not names:
        raise InputError(f"--format {text!r}: allowed formats are {', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(names))


def render(run_dir: Path, fmt: str) -> str | dict[str, bytes]:
    """The report text in ``fmt``; for png, {file name: bytes}, one speed-against-drift figure per group."""
    if fmt == "md":
        from bench.report.markdown import markdown_report

        return markdown_report(run_dir)
    if fmt == "html":
        from bench.report.html import html_report

        return html_report(run_dir)
    if fmt == "csv":
        from bench.report.csv import csv_report
        from bench.results import read_records

        return csv_report(read_records(run_dir))
    if fmt == "json":
        from bench.report.json_report import json_report

        return json_report(run_dir)
    from bench.report import plots
    from bench.report.table import group_records
    from bench.results import read_records

    groups = group_records(read_records(run_dir))
    figures = {}
    for g in groups:
        fig = plots.speed_vs_drift(g)
        if fig is not None:
            name = FORMATS["png"] if len(groups) == 1 else f"speed-vs-drift-{g.slug}.png"
            if name in figures:  # two models whose names differ only in punctuation
                name = name.removesuffix(".png") + f"-{len(figures)}.png"
            figures[name] = plots.png(fig)
    return figures


def write_reports(run_dir: Path, formats: list[str], out_dir: Path | None = None) -> list[Path]:
    """Write each format's file (names in FORMATS) into ``out_dir`` (default: the run directory).

    Every format is rendered before anything is written, so a run that cannot be rendered leaves
    no partial set of reports (and no new folder) behind.
    """
    from optimize.atomic import write_file

    out_dir = Path(out_dir or run_dir)
    files: dict[str, str | bytes] = {}
    for fmt in formats:
        content = render(run_dir, fmt)
        files.update(content if isinstance(content, dict) else {FORMATS[fmt]: content})
    written = []
    for name, data in files.items():
        write_file(out_dir / name, data)
        written.append(out_dir / name)
    return written
