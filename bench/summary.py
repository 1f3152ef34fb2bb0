"""The short summary table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mib(value) -> str:
    return f"{value / 2**20:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value, fmt: str = "{:.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        m, s = r.get("metrics", {}), r["scenario"]
        rows.append([
            r["model"], r["variant"], r["device"], f"{s['batch_size']}/{s['prompt_tokens']}/{s['new_tokens']}",
            r["status"], _num(m.get("ttft_ms", {}).get("p50")), _num(m.get("tpot_ms", {}).get("p50"), "{:.2f}"),
            _num(m.get("prefill_tokens_per_s")), _num(m.get("decode_tokens_per_s")),
            _mib(m.get("peak_memory_bytes")), _mib(m.get("weights_bytes")),
            _num(m.get("perplexity"), "{:.2f}"), _num(m.get("kld_mean"), "{:.2e}"),
            _num(m.get("top1_agreement"), "{:.3f}"), _drift_flag(r),
        ])
    return rows


def _drift_flag(r: dict[str, Any]) -> str:
    if "drift_ok" not in r:
        return "-"
    return "ok" if r["drift_ok"] else "OVER" if r.get("drift_violations") else "error"


HEADER = ["model", "variant", "device", "b/p/n", "status", "TTFT ms", "TPOT ms", "prefill tok/s", "decode tok/s",
          "peak MiB", "weights MiB", "ppl", "KLD mean", "top-1", "drift"]


def print_summary(records: list[dict[str, Any]], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run_dir} (p50 over repetitions)")
    for h in HEADER:
        table.add_column(h, justify="right" if h not in ("model", "variant", "status") else "left")
    for row in summary_rows(records):
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    for r in records:
        if r["status"] != "ok" and r.get("error"):
            console.print(f"{r['variant']} ({r['status']}): {r['error'].splitlines()[0][:200]}", markup=False)
    print(f"results: {run_dir / 'results.jsonl'}")
