"""``infermatrix merge``: combine shard runs of one matrix into one run directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="shard run directories")
    p.add_argument("--out", type=Path, required=True, help="merged run directory to create")


def main(args: argparse.Namespace) -> int:
    from bench.merge import merge_runs

    info = merge_runs(args.runs, args.out)
    print(f"merged {info['cells']} cells into {info['out']}")
    return 0
