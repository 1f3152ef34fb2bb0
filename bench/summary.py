"""The short summary table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.catalogue import METRICS, point
from optimize.errors import clip

# Metric columns of the end-of-run table (catalogue keys); labels and formats come from the catalogue.
SUMMARY_METRICS = ["ttft_ms", "tpot_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes",
                   "weights_bytes", "perplexity", "kld_mean", "top1_agreement"]
HEADER = ["model", "variant", "device", "b/p/n", "status", *(METRICS[k].label for k in SUMMARY_METRICS), "drift"]


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        s = r["scenario"]
        rows.append([r["model"], r["variant"], r["device"], f"{s['batch_size']}/{s['prompt_tokens']}/{s['new_tokens']}",
                     r["status"], *(METRICS[k].format(point(r, k)) for k in SUMMARY_METRICS), _drift_flag(r)])
    return rows


def _drift_flag(r: dict[str, Any]) -> str:
    if "drift_ok" not in r:
        return "-"
    return "ok" if r["drift_ok"] else "OVER" if r.get("drift_violations") else "error"


def drift_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per variant whose drift failed the run's check (``run`` exits 1 for it; the table only flags it):
    each limit of the matrix's budget it broke, as the cell recorded it, or why drift failed.

    Drift is measured once per variant and shared by its cells, so a variant's cells repeat its line once.
    A variant is named alone unless the run holds more than one model or device.
    """
    from bench.progress import error_cause

    several = len({(r["model"], r["device"]) for r in records}) > 1
    lines = []
    for r in records:
        if r.get("drift_ok") is not False:
            continue
        name = f"{r['variant']} ({r['model']}, {r['device']})" if several else r["variant"]
        if r.get("drift_violations"):
            lines.append(f"{name} over its drift budget: {'; '.join(r['drift_violations'])}")
        else:
            cause = clip(error_cause(r.get("drift_error")), 200) or "(no error recorded)"
            lines.append(f"{name} drift failed: {cause}")
    return list(dict.fromkeys(lines))


def print_summary(records: list[dict[str, Any]], run_dir: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from bench.progress import console as rich_console
    from bench.progress import error_cause

    if not records:  # a shard the matrix left empty: no table of nothing, and no results file to point at
        print(f"no cells: nothing was measured in {run_dir}")
        return
    rounds = max(((r.get("rounds") or {}).get("configured", 1) for r in records), default=1)
    over = "the repetitions of every ok round" if rounds > 1 else "repetitions"
    table = Table(title=escape(f"{run_dir} (p50 over {over})"))
    for h in HEADER:
        table.add_column(h, justify="right" if h not in ("model", "variant", "status") else "left")
    for row in summary_rows(records):
        table.add_row(*(escape(str(cell)) for cell in row))  # paths and names may hold [brackets]
    console = rich_console(width=200)
    console.print(table)
    for r in records:
        if r["status"] != "ok" and r.get("error"):
            console.print(f"{r['variant']} ({r['status']}): {clip(error_cause(r['error']), 200)}", markup=False)
    for line in drift_lines(records):
        console.print(line, markup=False)
    if all(r["status"] == "skipped" for r in records):
        console.print(f"nothing was measured: all {len(records)} cell{'s' * (len(records) != 1)} skipped, each with "
                      "its reason above (a skip is what this machine cannot run, not a failure: exit 0)", markup=False)
    print(f"results: {run_dir / 'results.jsonl'}")
