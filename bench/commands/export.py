"""``infermatrix export``: a run in pytest-benchmark or github-action-benchmark format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.commands import emit, nonempty, output_file

# Flags that shape one target's output only: given with another --to, they would be silently ignored.
TARGET_FLAGS = {"direction": "github-action-benchmark"}
DEFAULT_DIRECTION = "smaller"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=nonempty("RUN", Path), help="run directory")
    p.add_argument("--to", required=True, choices=("pytest-benchmark", "github-action-benchmark"),
                   help="pytest-benchmark: JSON that 'pytest-benchmark compare' loads; github-action-benchmark: "
                        "the customSmallerIsBetter / customBiggerIsBetter list (see --direction)")
    p.add_argument("--direction", choices=("smaller", "bigger"),
                   help="github-action-benchmark only: smaller (latency, memory, drift: customSmallerIsBetter) "
                        f"or bigger (tokens/s, top-1: customBiggerIsBetter) (default: {DEFAULT_DIRECTION})")
    p.add_argument("--out", type=nonempty("--out", Path), help="write here (default, or '-': print)")


def main(args: argparse.Namespace) -> int:
    from bench.export import github_action_benchmark, pytest_benchmark_json
    from bench.results import require_run_dir
    from optimize.errors import InputError

    for dest, target in TARGET_FLAGS.items():
        if getattr(args, dest) is not None and args.to != target:
            raise InputError(f"--{dest} is for --to {target} only, not --to {args.to}")
    require_run_dir(args.run)
    output_file(args.out, stdout=True)
    data = (pytest_benchmark_json(args.run) if args.to == "pytest-benchmark"
            else github_action_benchmark(args.run, args.direction or DEFAULT_DIRECTION))
    if not (data["benchmarks"] if args.to == "pytest-benchmark" else data):  # a CI tracker would record nothing
        raise InputError(f"{args.run} has no ok cell with figures to export")
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    emit(text, args.out)
    return 0
