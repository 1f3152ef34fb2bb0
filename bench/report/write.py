"""Render a run directory's reports in the requested formats."""

from __future__ import annotations

from pathlib import Path

from optimize.errors import InputError
from optimize.registry import first_repeat

FORMATS = {"md": "report.md", "html": "report.html", "csv": "results.csv", "json": "report.json",
           "png": "speed-vs-drift.png"}
RUN_END_FORMATS = ("md", "html", "csv")


def parse_formats(text: str) -> list[str]:
    """``"md,html"`` -> ``["md", "html"]``; unknown or empty names (``md,,html``) and a format named twice
    (``md,md``: a typo, as in every other comma list) raise InputError.
    """
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in FORMATS]
    if bad:
        raise InputError(f"--format {text!r}: allowed formats are {', '.join(FORMATS)} (comma-separated)")
    twice = first_repeat(names)
    if twice is not None:
        raise InputError(f"--format names format {twice!r} twice in {text!r}")
    return names


def _load(run_dir: Path) -> tuple[dict, list[dict]]:
    """run.json and one record per cell (a cell's rounds pooled)."""
    from bench.results import read_run
    from bench.rounds import read_cell_records

    run = read_run(run_dir)
    return run, read_cell_records(run_dir, run)


def render(run_dir: Path, fmt: str, loaded: tuple[dict, list[dict]] | None = None) -> str | dict[str, bytes]:
    """The report text in ``fmt``; for png, {file name: bytes}, one speed-against-drift figure per group.

    ``loaded`` is ``(run, read_cell_records(run_dir, run))`` when the caller has read them
    already (several formats of one run are rendered from one reading).
    """
    if loaded is None:
        loaded = _load(run_dir)
    run, records = loaded
    if fmt == "md":
        from bench.report.markdown import markdown_text

        return markdown_text(run, records)
    if fmt == "html":
        from bench.report.html import html_text

        return html_text(run, records)
    if fmt == "csv":
        from bench.report.csv import csv_report

        return csv_report(records)
    if fmt == "json":
        from bench.report.json_report import json_text

        return json_text(run, records)
    from bench.report import plots
    from bench.report.table import group_records

    groups = group_records(records)
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

    The run is read once; every format is rendered before anything is written, so a run that cannot be rendered leaves
    no partial set of reports (and no new folder) behind.
    """
    from optimize.atomic import write_file

    out_dir = Path(out_dir or run_dir)
    loaded = _load(run_dir)  # once for every format
    files: dict[str, str | bytes] = {}
    for fmt in formats:
        content = render(run_dir, fmt, loaded)
        files.update(content if isinstance(content, dict) else {FORMATS[fmt]: content})
    written = []
    for name, data in files.items():
        write_file(out_dir / name, data)
        written.append(out_dir / name)
    return written
