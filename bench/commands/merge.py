"""``infermatrix merge``: combine shard runs of one matrix into one run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.commands import folder, nonempty


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=nonempty("RUN", Path), help="shard run directories")
    p.add_argument("--out", type=folder("--out"), required=True, help="merged run directory to create")
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
    if info["missing_shards"]:
        print(f"infermatrix merge: warning: shard {', '.join(info['missing_shards'])} not among the runs: its "
              "cells have no record in the merged run (run.json: missing_shards)", file=sys.stderr)
    if info["roofline_differences"]:
        print(f"infermatrix merge: warning: the runs measured different roofline ceilings "
              f"({'; '.join(info['roofline_differences'])}): each record's fractions are of its own run's ceilings "
              "(its metrics.roofline_ceilings; run.json: shard_rooflines, roofline_differences)", file=sys.stderr)
    for d in info["unfinished"]:
        print(f"infermatrix merge: warning: {d} never ended (interrupted, or still running): the merged run is "
              f"unfinished ('infermatrix run --resume {d}' completes it; merge again after)", file=sys.stderr)
    return 0
