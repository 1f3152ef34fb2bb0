"""report.json: the comparison as data (for pipelines): groups, rows with intervals, the default choice."""

from __future__ import annotations

import json
import math
from typing import Any

from bench.catalogue import METRICS
from bench.orchestrate import unrecorded_cells
from bench.report.table import NOISY_REL_CI, drift_protocol_name, group_records
from bench.select import decide, default_objective


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_text(run: dict, records: list[dict]) -> str:
    """The JSON report of a run description and its records (as ``read_run``/``read_records`` give them)."""
    groups = []
    for g in group_records(records):
        rows = []
        for row in g.rows:
            figs = {k: {"value": f.value, "ci95": list(f.ci) if f.ci else None, "n": f.n, "noisy": f.noisy,
                        "unit": METRICS[k].unit, "direction": METRICS[k].direction}
                    for k, f in row.figures.items() if f.value is not None}
            rows.append({"variant": row.variant, "cell_id": row.record["cell_id"], "status": row.status,
                         "error": row.record.get("error"), "rounds": row.record.get("rounds"),
                         "drift_ok": row.record.get("drift_ok"),
                         "drift_protocol": drift_protocol_name(row.record),
                         "speedup": [_clean(x) for x in row.speedup] if row.speedup else None,
                         "speedup_noisy": row.speedup_noisy if row.speedup else None, "metrics": figs})
        groups.append({"model": g.model, "device": g.device, "scenario": g.scenario, "reference": g.reference,
                       "speedup_metric": g.speedup_metric, "rows": rows,
                       "selection": decide(g, default_objective(g), []).to_dict()})
    unrecorded = unrecorded_cells(run, records)  # None: run.json cannot say which cells its matrix holds
    return json.dumps({"run": run["matrix"]["name"], "started": run.get("started"), "ended": run.get("ended"),
                       "unrecorded_cells": None if unrecorded is None else [c.key for c in unrecorded],
                       "noisy_rel_ci": NOISY_REL_CI, "groups": groups}, indent=1, allow_nan=False) + "\n"
