"""``infermatrix history``: key metrics of runs per commit in a SQLite file."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.commands import nonempty

DEFAULT_DB = Path("reports") / "history.sqlite"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="append a run's key metrics with its commit and environment")
    add.add_argument("run", type=nonempty("RUN", Path), help="run directory")
    add.add_argument("--commit", help="commit the run measured (default: the commit recorded in the run, "
                                      "else HEAD of the git repository here)")
    add.add_argument("--partial", action="store_true",
                     help="add a run that has not ended or lacks cells of its matrix (refused otherwise: once "
                          "added, the finished run could not be)")
    show = sub.add_parser("show", help="print a metric across commits")
    show.add_argument("--metric", default="decode_tokens_per_s", help="metric key (default decode_tokens_per_s)")
    show.add_argument("--cell", help="only cells whose identity contains this text")
    show.add_argument("--plot", type=nonempty("--plot", Path), metavar="FILE",
                      help="also draw the series (.png or .svg)")
    for sp in (add, show):
        sp.add_argument("--db", type=nonempty("--db", Path), default=DEFAULT_DB,
                        help=f"SQLite file (default {DEFAULT_DB})")


def _head_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def recorded_commit(run: dict) -> str | None:
    """The commit a run measured (``bench.results.recorded_revision``)."""
    from bench.results import recorded_revision

    return recorded_revision(run)["commit"]


def _commit_of(run_dir: Path) -> tuple[str | None, str | None]:
    """(the commit the run recorded (``recorded_commit``), else HEAD here; a warning when HEAD differs from the
    recorded commit, else None): the run measured the recorded one, whatever is checked out here.
    """
    from bench.results import read_run

    recorded = recorded_commit(read_run(run_dir))
    head = _head_commit()
    if recorded and head and head != recorded:
        return recorded, (f"{run_dir} recorded commit {recorded[:12]}, HEAD here is {head[:12]}: added under the "
                          "recorded commit (--commit names another)")
    return recorded or head, None


def _short_of_cells(run_dir: Path) -> str | None:
    """Why a run is not whole ('it has not ended; 3 of 10 cells have no record'), or None when it is."""
    from bench.orchestrate import unrecorded_cells, unrecorded_count
    from bench.results import read_records, read_run, require_run_dir

    require_run_dir(run_dir)
    run, records = read_run(run_dir), read_records(run_dir)
    why = [] if run.get("ended") else ["it has not ended (interrupted, or still running)"]
    if run.get("missing_shards"):
        why.append(f"it was merged without shards {', '.join(run['missing_shards'])}")
    if run.get("shard") and run["shard"] != "1/1":  # its records are whole for the shard, not for the matrix
        why.append(f"it is shard {run['shard']} of its matrix (add the run 'infermatrix merge' makes of the shards)")
    missing = unrecorded_cells(run, records)
    if missing:
        why.append(unrecorded_count(missing, records))
    return "; ".join(why) or None


def main(args: argparse.Namespace) -> int:
    from bench import history
    from bench.catalogue import metric
    from bench.commands import output_file
    from bench.compare import gated_metrics
    from optimize.errors import InputError

    if args.action == "add":
        output_file(args.db, "--db")
        short = _short_of_cells(args.run)
        if short and not args.partial:
            from bench.results import read_run

            side = read_run(args.run).get("ab")
            # a side of an A/B job cannot be resumed alone: its worktree is gone, and its cells ran interleaved
            finish = (f"it is the {side.get('side')} side of an 'infermatrix ab' job: run the job again"
                      if isinstance(side, dict) else f"finish it ('infermatrix run --resume {args.run}')")
            raise InputError(f"{args.run}: {short}: {finish}, or add what it holds with --partial (a run is added "
                             "once)")
        if short:
            print(f"infermatrix history: warning: {args.run}: {short}; adding the cells it holds", file=sys.stderr)
        commit, differs = (args.commit, None) if args.commit else _commit_of(args.run)
        info = history.add_run(args.db, args.run, commit)
        if differs:
            print(f"infermatrix history: warning: {differs}", file=sys.stderr)
        print(f"added {args.run} (commit {info['commit'] or 'unknown'}): {info['cells']} cells, "
              f"{info['metrics']} figures to {args.db}")
        return 0
    keys = [m.key for m in gated_metrics()]
    if args.metric not in keys:
        raise InputError(f"--metric {args.metric!r} is not recorded in history; one of {keys}")
    if not args.db.exists():
        raise InputError(f"--db {args.db} does not exist; add a run first with 'infermatrix history add DIR'")
    if args.plot and args.plot.suffix.lower() not in history.PLOT_SUFFIXES:
        raise InputError(f"--plot {str(args.plot)!r} must end in {' or '.join(history.PLOT_SUFFIXES)}")
    output_file(args.plot, "--plot")
    points = history.series(args.db, args.metric, args.cell)
    shown = metric(args.metric)  # the reports' display unit and format (bytes as MiB)
    print(f"{'commit':10} {'started':20} {'median ' + shown.shown_unit:>14} {'n':>4}  cell")
    for p in points:
        print(f"{(p['commit'] or '?')[:10]:10} {p['started'] or '?':20} {shown.format(p['median']):>14} {p['n']:4}  "
              f"{p['cell']}")
    if args.plot and points:
        print(f"plot: {history.plot(points, args.metric, args.plot)}")
    elif args.plot:
        print(f"infermatrix history: no plot written: {args.db} holds no {args.metric} figures"
              + (f" of cells matching {args.cell!r}" if args.cell else ""), file=sys.stderr)
    return 0
