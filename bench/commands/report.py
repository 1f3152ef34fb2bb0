"""``infermatrix report``: comparison reports of a run directory (Markdown, HTML, CSV, JSON, PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.commands import emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--format", default="md",
                   help="comma-separated: md, html, csv, json, png (speed against drift) (default: md)")
    p.add_argument("--out", type=Path,
                   help="one text format: write to this file (default: print it); several formats or png: "
                        "write report.md, report.html, results.csv, report.json, speed-vs-drift.png into this "
                        "directory (default: the run directory)")


def main(args: argparse.Namespace) -> int:
    from bench.report.write import parse_formats, render, write_reports
    from bench.results import RUN
    from optimize.errors import InputError

    formats = parse_formats(args.format)
    if not (args.run / RUN).exists():
        raise InputError(f"{args.run} is not a run directory (no {RUN})")
    if len(formats) == 1 and formats[0] != "png":
        text = render(args.run, formats[0])
        emit(text, args.out)
        return 0
    for path in write_reports(args.run, formats, args.out):
        print(path)
    return 0
