"""``infermatrix export``: a run in pytest-benchmark or github-action-benchmark format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.commands import emit, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--to", required=True, choices=("pytest-benchmark", "github-action-benchmark"),
                   help="pytest-benchmark: JSON that 'pytest-benchmark compare' loads; github-action-benchmark: "
                        "the customSmallerIsBetter / customBiggerIsBetter list (see --direction)")
    p.add_argument("--direction", choices=("smaller", "bigger"), default="smaller",
                   help="github-action-benchmark only: smaller (latency, memory, drift: customSmallerIsBetter) "
                        "or bigger (tokens/s, top-1: customBiggerIsBetter) (default: smaller)")
    p.add_argument("--out", type=Path, help="write here (default: print)")


def main(args: argparse.Namespace) -> int:
    from bench.export import github_action_benchmark, pytest_benchmark_json
    from bench.results import RUN
    from optimize.errors import InputError

    if not (args.run / RUN).exists():
        raise InputError(f"{args.run} is not a run directory (no {RUN})")
    output_file(args.out)
    data = (pytest_benchmark_json(args.run) if args.to == "pytest-benchmark"
            else github_action_benchmark(args.run, args.direction))
    if not (data["benchmarks"] if args.to == "pytest-benchmark" else data):  # a CI tracker would record nothing
        raise InputError(f"{args.run} has no ok cell with figures to export")
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    emit(text, args.out)
    return 0
