"""``infermatrix compare``: the regression gate over two run directories.

Exit codes: 1 only when a metric regressed (or a cell that ran in base fails in head),
2 on bad input (a cell in only one run, a metric without samples), 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.commands import nonempty


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``compare`` and ``ab``; defaults come from ``GateConfig``."""
    from bench.gate_stats import GateConfig

    d = GateConfig()
    p.add_argument("--speed-threshold", type=float, default=d.speed_threshold,
                   help=f"relative change a latency or throughput must exceed (default {d.speed_threshold})")
    p.add_argument("--memory-threshold", type=float, default=d.memory_threshold,
                   help=f"relative change peak memory must exceed (default {d.memory_threshold})")
    p.add_argument("--fdr", type=float, default=d.fdr,
                   help=f"Benjamini-Hochberg false discovery rate (default {d.fdr})")
    p.add_argument("--level", type=float, default=d.level, help=f"bootstrap interval level (default {d.level})")
    p.add_argument("--n-resamples", type=int, default=d.n_resamples, help="bootstrap resamples")
    p.add_argument("--min-processes", type=int, default=d.min_processes,
                   help=f"processes per side a speed verdict needs (default {d.min_processes}; "
                        "runs with [measure] rounds >= 2 or ab have them; 1 for a quiet dedicated machine)")
    p.add_argument("--allow-env-mismatch", action="store_true",
                   help="call regressions even when the two runs' environments differ")
    p.add_argument("--allow-unmatched", action="store_true", help="skip cells present in only one run (listed)")
    p.add_argument("--json", type=nonempty("--json", Path), metavar="FILE",
                   help="also write the full comparison as JSON ('-': stdout)")
    p.add_argument("--markdown", type=nonempty("--markdown", Path), metavar="FILE",
                   help="also write the Markdown summary here (default: $GITHUB_STEP_SUMMARY when set, appended)")
    p.add_argument("--all", action="store_true", help="list unchanged comparisons too")


def gate_config(args: argparse.Namespace):
    from bench.gate_stats import GateConfig

    return GateConfig(speed_threshold=args.speed_threshold, memory_threshold=args.memory_threshold, fdr=args.fdr,
                      level=args.level, n_resamples=args.n_resamples, min_processes=args.min_processes)


def _summary_file(args: argparse.Namespace) -> tuple[Path | None, str]:
    if args.markdown:
        return args.markdown, "--markdown"
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    return (Path(step), "GITHUB_STEP_SUMMARY") if step else (None, "")


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output files that cannot be written (or are a run's own files) before any comparing."""
    from bench.commands import output_file

    output_file(args.json, "--json", stdout=True)
    summary, what = _summary_file(args)
    output_file(summary, what)


def emit(comparison, args: argparse.Namespace) -> int:
    """Print the summary, write the requested files, and return the gate's exit code.

    A file that cannot be written is exit 2 (bad input), never the gate's 1.
    """
    import sys

    from bench.commands import write_output
    from bench.compare_output import markdown_summary
    from optimize.errors import InputError

    text = markdown_summary(comparison, show_all=args.all)
    if args.json and str(args.json) == "-":
        print(comparison.to_json())
    else:
        print(text, end="")
        if args.json:
            write_output(args.json, comparison.to_json() + "\n", "--json")
    summary, what = _summary_file(args)
    if summary:
        try:
            with open(summary, "a") as f:
                f.write(text)
        except OSError as exc:
            raise InputError(f"{what} {summary}: could not append the summary ({exc.strerror or exc})") from None
    if comparison.same_run:
        print(f"warning: BASE and HEAD are one run ({comparison.same_run}): nothing can regress", file=sys.stderr)
    for row in comparison.regressed:
        change = f" {(row.ratio - 1) * 100:+.1f}%" if row.ratio is not None else ""
        print(f"regressed: {row.cell}: {row.label}{change} {row.note}".rstrip(),
              file=sys.stderr)
    return comparison.exit_code()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=nonempty("BASE", Path), help="base run directory")
    p.add_argument("head", type=nonempty("HEAD", Path), help="head run directory")
    add_gate_arguments(p)


def main(args: argparse.Namespace) -> int:
    from bench.compare import compare_runs

    check_outputs(args)
    comparison = compare_runs(args.base, args.head, gate_config(args), allow_env_mismatch=args.allow_env_mismatch,
                              allow_unmatched=args.allow_unmatched)
    return emit(comparison, args)
