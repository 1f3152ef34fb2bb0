"""results.csv: one row per cell, flat columns named with their units.

Identity columns first (``rounds_ok``: how many ok rounds a row's figures pool), then every
catalogue metric present in any record: a summary metric becomes ``KEY_p50``,
``KEY_ci95_low``, ``KEY_ci95_high``, ``KEY_mean``, ``KEY_std``, ``KEY_min``, ``KEY_max``,
``KEY_p90``, ``KEY_p99``, ``KEY_n`` (the key carries the unit, e.g. ``ttft_ms_p50``); a
scalar keeps its key (``peak_memory_bytes``). A name or error that a spreadsheet would run as
a formula is written with a leading apostrophe.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from bench.catalogue import METRICS
from bench.progress import error_cause
from bench.report.table import drift_protocol_name, group_records

IDENTITY = ["cell_id", "model", "variant", "device", "scenario", "batch_size", "prompt_tokens", "new_tokens",
            "status", "error", "rounds_ok", "drift_ok", "drift_protocol", "speedup_vs_reference", "speedup_ci95_low",
            "speedup_ci95_high", "reference_variant"]
SUMMARY_FIELDS = ["p50", "ci95_low", "ci95_high", "mean", "std", "min", "max", "p90", "p99", "n"]


def metric_columns(records: list[dict[str, Any]]) -> list[str]:
    present = {k for r in records for k in (r.get("metrics") or {})}
    cols = []
    for key, m in METRICS.items():
        if key not in present or m.shape == "object":
            continue
        cols += [f"{key}_{f}" for f in SUMMARY_FIELDS] if m.shape == "summary" else [key]
    return cols


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (record.get("metrics") or {}).items():
        m = METRICS.get(key)
        if m is not None and m.shape == "summary" and isinstance(value, dict):
            ci = value.get("ci95_p50") or [None, None]
            out.update({f"{key}_{f}": value.get(f) for f in SUMMARY_FIELDS if f in value})
            out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = ci
        else:  # the writer drops keys that are no column: unknown metrics, structured ones
            out[key] = value
    return out


def cell_text(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (a leading ``=``, ``+``, ``-``, ``@``, tab or carriage return)
    gets a leading apostrophe, as OWASP advises for CSV files; any other value is left as it is.
    """
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def csv_report(records: list[dict[str, Any]]) -> str:
    """The CSV text of ``records`` (in report order: grouped by scenario)."""
    cols = IDENTITY + metric_columns(records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for g in group_records(records):
        for row in g.rows:
            r, s = row.record, row.record["scenario"]
            line = {"cell_id": r["cell_id"], "model": r["model"], "variant": r["variant"], "device": r["device"],
                    "scenario": s["name"], "batch_size": s["batch_size"], "prompt_tokens": s["prompt_tokens"],
                    "new_tokens": s["new_tokens"], "status": r["status"], "error": error_cause(r.get("error")),
                    "rounds_ok": (r.get("rounds") or {}).get("ok", int(r["status"] == "ok")),
                    "drift_ok": r.get("drift_ok"), "drift_protocol": drift_protocol_name(r) or "",
                    "reference_variant": g.reference or ""}
            if row.speedup:
                line.update(speedup_vs_reference=row.speedup[0], speedup_ci95_low=row.speedup[1],
                            speedup_ci95_high=row.speedup[2])
            line.update(_flat(r))
            w.writerow({k: cell_text(v) for k, v in line.items()})  # text only: a figure is never touched
    return buf.getvalue()
