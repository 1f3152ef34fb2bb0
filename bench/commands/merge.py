"""``infermatrix merge``: combine shard runs of one matrix into one run directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="shard run directories")
    p.add_argument("--out", type=Path, required=True, help="merged run directory to create")
    p.add_argument("--allow-env-mismatch", action="store_true",
                   help="merge shards from different CPU models or libraries (recorded; compare reports it)")


def main(args: argparse.Namespace) -> int:
    from bench.merge import merge_runs
    from optimize.atomic import folder_problem
    from optimize.errors import InputError

    problem = folder_problem(args.out.parent)  # the merged run is built in a sibling, then renamed into place
    if problem:
        raise InputError(f"--out {args.out}: its folder {args.out.parent} {problem}")
    info = merge_runs(args.runs, args.out, allow_env_mismatch=args.allow_env_mismatch)
    print(f"merged {info['cells']} cells into {info['out']}")
    return 0
