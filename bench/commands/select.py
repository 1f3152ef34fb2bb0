"""``infermatrix select``: the variant to deploy under constraints, with why each other one lost.

Exit codes: 0 a variant was chosen (in every group), 1 nothing satisfies the constraints
(in some group), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.commands import nonempty


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=nonempty("RUN", Path), help="run directory")
    p.add_argument("--objective",
                   help="catalogue metric to optimise; its direction comes from the catalogue (default: "
                        "decode_tokens_per_s, and prefill_tokens_per_s for a prefill sweep's cells; e.g. ttft_ms, "
                        "tpot_ms, peak_memory_bytes, kld_mean)")
    p.add_argument("--max-kld", type=float, help="largest mean KL divergence (nats/token) against the reference")
    p.add_argument("--max-ppl-ratio", type=float, help="largest perplexity ratio against the reference")
    p.add_argument("--min-top1", type=float, help="smallest top-1 agreement with the reference (0-1)")
    p.add_argument("--max-memory-mib", type=float, help="largest peak memory of the whole cell (load included), MiB")
    p.add_argument("--max-serving-memory-mib", type=float,
                   help="largest peak memory while generating (after load: warm-up and timed repetitions), MiB")
    p.add_argument("--max-ttft-ms", type=float, help="largest p50 time to first token, ms")
    p.add_argument("--max-tpot-ms", type=float, help="largest p50 time per output token, ms")
    p.add_argument("--where", action="append", default=[], metavar="METRIC[.STAT]<=VALUE",
                   help="a bound on any catalogue metric in its stored unit (ms, bytes, tokens/s), repeatable; "
                        "<= or >=; STAT (p50, p90, p99, mean, min, max) for metrics with a value per repetition, "
                        "e.g. 'ttft_ms.p99<=200', 'itl_ms.p99<=40', 'kld_p99<=0.1', 'decode_tokens_per_s>=100'")
    p.add_argument("--device", help="only cells on this device (cpu, cuda)")
    p.add_argument("--scenario", help="only this scenario: a name (generate) or name:BATCH/PROMPT/NEW")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")


def main(args: argparse.Namespace) -> int:
    from bench.orchestrate import unrecorded_cells, unrecorded_count
    from bench.results import read_run, require_run_dir
    from bench.rounds import read_cell_records
    from bench.select import CONSTRAINT_FLAGS, constraints_from, format_decisions, parse_where, select

    require_run_dir(args.run)
    run = read_run(args.run)  # a corrupt run description is refused here as by every other reader
    constraints = constraints_from({name: getattr(args, name) for name in CONSTRAINT_FLAGS})
    constraints += [parse_where(text) for text in args.where]
    records = read_cell_records(args.run, run)
    decisions = select(records, args.objective, constraints, args.device, args.scenario)
    satisfied = all(d.chosen for d in decisions)
    unrecorded = unrecorded_cells(run, records)
    ended = bool(run.get("ended")) and not run.get("missing_shards")
    if args.json:
        json.dump({"satisfied": satisfied, "run_ended": ended,
                   "unrecorded_cells": None if unrecorded is None else [c.key for c in unrecorded],
                   "groups": [d.to_dict() for d in decisions]}, sys.stdout, indent=1, allow_nan=False)
        print()
    else:
        print(format_decisions(decisions), end="")
    if not ended or unrecorded:  # a choice among the cells that ran: one that never ran might have won
        why = [f"shards {', '.join(run['missing_shards'])} were not merged" if run.get("missing_shards")
               else "" if run.get("ended") else "it has not ended (interrupted, or still running)"]
        why += [unrecorded_count(unrecorded, records)] if unrecorded else []
        print(f"infermatrix select: warning: {args.run}: {'; '.join(w for w in why if w)}; the choice is among "
              "the cells recorded so far", file=sys.stderr)
    return 0 if satisfied else 1
