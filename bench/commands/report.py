"""``infermatrix report``: a Markdown report of a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, help="write the report here instead of printing it")


def main(args: argparse.Namespace) -> int:
    from bench.report.markdown import markdown_report
    from bench.results import RUN
    from optimize.errors import InputError

    if not (args.run / RUN).exists():
        raise InputError(f"{args.run} is not a run directory (no {RUN})")
    text = markdown_report(args.run)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0
