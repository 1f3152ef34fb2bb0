"""``infermatrix report``: comparison reports of a run directory (Markdown, HTML, CSV, JSON, PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.commands import emit, nonempty, output_dir, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=nonempty("RUN", Path), help="run directory")
    p.add_argument("--format", default="md",
                   help="comma-separated: md, html, csv, json, png (default: md). png: decode tokens/s against "
                        "drift, a figure per scenario group that has both: speed-vs-drift.png for a run of one "
                        "group, else speed-vs-drift-MODEL-DEVICE-SCENARIO-bBATCH-pPROMPT-nNEW.png")
    p.add_argument("--out", type=nonempty("--out", Path),
                   help="one text format: write to this file (default, or '-': print it); several formats or png: "
                        "write report.md, report.html, results.csv, report.json and the png figures into this "
                        "directory (default: the run directory)")


def main(args: argparse.Namespace) -> int:
    from bench.report.write import parse_formats, render, write_reports
    from bench.results import require_run_dir
    from optimize.errors import InputError

    formats = parse_formats(args.format)
    require_run_dir(args.run)
    if len(formats) == 1 and formats[0] != "png":
        output_file(args.out, stdout=True)
        text = render(args.run, formats[0])
        emit(text, args.out)
        return 0
    if args.out is not None and str(args.out) == "-":
        raise InputError("--out -: several formats (or png) are written as files into a folder; give a folder, "
                         "or one text format to print it")
    output_dir(args.out or args.run, "--out" if args.out else "the run directory")
    try:
        written = write_reports(args.run, formats, args.out)
    except OSError as exc:  # a full disk midway: the reports written so far are whole, the rest missing
        raise InputError(f"--out {args.out or args.run}: could not write the reports ({exc.strerror or exc})") \
            from None
    for path in written:
        print(path)
    if "png" in formats and not any(path.suffix == ".png" for path in written):
        print("infermatrix report: no png written: the speed-against-drift figure needs ok cells with both a "
              "decode rate and drift figures, and no group of this run has them; report.html has every other "
              "figure", file=sys.stderr)
    return 0
