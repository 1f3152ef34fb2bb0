"""One record per cell from a run measured in rounds (``[measure] rounds = k``).

Each round of a cell is a record of its own in results.jsonl, from a fresh process.
Reports, ``select`` and the end-of-run table read one record per cell: its ok rounds
pooled. Repetitions are pooled into one sample per metric and the summaries recomputed
from it (median, percentiles, n); the interval of a pooled median also spans every
round's own median, so a shift between processes widens it rather than hiding in the
pool. Figures measured once per process (memory, roofline, drift) are the median over
the rounds. ``rounds`` on the record says how many rounds its figures rest on and which
rounds did not end ok. ``compare``, ``ab`` and ``history`` keep the rounds apart (blocks).
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

from bench.catalogue import DRIFT_KEYS
from bench.progress import error_cause
from bench.stats import summarize
from optimize.errors import clip

# The sample a summary metric is computed from, where its name differs (a rate's summary).
SUMMARY_SUFFIX = "_summary"


def configured_rounds(run: dict[str, Any]) -> int:
    """The rounds per cell the run's matrix asked for (1 when run.json does not say)."""
    value = ((run.get("matrix") or {}).get("measure") or {}).get("rounds")
    return max(value, 1) if isinstance(value, int) and not isinstance(value, bool) else 1


def read_cell_records(run_dir: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's records, one per cell (``cell_records``), in results.jsonl order."""
    from bench.results import read_records

    return cell_records(read_records(run_dir, latest_only=False), configured_rounds(run))


def cell_records(records: list[dict[str, Any]], rounds: int = 1) -> list[dict[str, Any]]:
    """One record per cell id, in order of first appearance: the cell's ok records pooled
    (``pool``), or its latest record when none is ok.

    Where the matrix asked for several rounds, or a cell has several records, the record
    gets ``rounds``: {"configured", "ok", "not_ok": [{"round", "status", "error"}, ...]}.
    """
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cell.setdefault(r["cell_id"], []).append(r)
    out = []
    for recs in by_cell.values():
        ok = [r for r in recs if r["status"] == "ok"]
        rec = pool(ok) if ok else dict(recs[-1])  # only a top-level key is added below
        if rounds > 1 or len(recs) > 1:
            rec["rounds"] = {"configured": rounds, "ok": len(ok),
                             "not_ok": [{"round": r.get("round"), "status": r["status"],
                                         "error": clip(error_cause(r.get("error")), 300) or None}
                                        for r in recs if r["status"] != "ok"]}
        out.append(rec)
    return out


def short_of_rounds(record: dict[str, Any]) -> bool:
    """True for a cell with fewer ok rounds than its matrix asked for."""
    info = record.get("rounds")
    return bool(info) and info["ok"] < info["configured"]


def failed_rounds(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed rounds of a cell that is short of its rounds (earlier failures made good count no more)."""
    return [x for x in record["rounds"]["not_ok"] if x["status"] == "failed"] if short_of_rounds(record) else []


def pool(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a cell's ok rounds: the latest's, with samples pooled and figures recomputed."""
    rec = copy.deepcopy(ok[-1])
    if len(ok) == 1:
        return rec
    rec.pop("round", None)
    samples = {key: [x for r in ok for x in r["samples"][key]] for key in rec["samples"]
               if all(isinstance(r["samples"].get(key), list) for r in ok)}
    rec["samples"] = samples
    _drift_from_a_round_that_scored_it(rec, ok)
    metrics = rec["metrics"]
    for key, value in list(metrics.items()):
        per_round = [r["metrics"].get(key) for r in ok]
        if isinstance(value, dict) and "p50" in value:
            source = samples.get(key.removesuffix(SUMMARY_SUFFIX))
            if source is None:  # its repetitions are not kept: nothing to pool
                # labels is optional on read (records written before it was kept lack it)
                rec["labels"] = [*rec.get("labels", []), f"{key}: the last round's figures alone (its "
                                 "repetitions are not kept, so the rounds cannot be pooled)"]
            else:
                metrics[key] = _pooled_summary(_flat(source), per_round)
        elif _number(value) and key in samples:  # a rate: the median over repetitions
            metrics[key] = float(statistics.median(_flat(samples[key])))
        elif all(_number(v) for v in per_round):  # measured once per process
            metrics[key] = statistics.median_low(per_round) if all(isinstance(v, int) for v in per_round) \
                else float(statistics.median(per_round))
    target = (rec.get("noise") or {}).get("target_rel_ci")
    if target:
        from bench.metrics.load import noise_mark

        rec.update(noise_mark(samples, target))
    return rec


def _drift_from_a_round_that_scored_it(rec: dict[str, Any], ok: list[dict[str, Any]]) -> None:
    """Where the latest ok round's drift failed (a timeout or crash while scoring it, say) and an
    earlier ok round scored it, the cell's drift is that round's, and a label says so.

    Drift is a property of the variant, not of the process: a failure to score it in one round
    does not undo another round's figures. Within-budget or over, the latest scored round's stands.
    """
    if rec.get("drift_ok") is not False or rec.get("drift_violations"):
        return
    scored = [r for r in ok if r.get("drift_ok") is True or r.get("drift_violations")]
    if not scored:
        return
    donor = scored[-1]
    for key, value in donor["metrics"].items():  # drift's figures (a figure of another kind stays the latest's)
        if key in DRIFT_KEYS:
            rec["metrics"][key] = copy.deepcopy(value)
    if "drift" in (donor.get("method") or {}):
        rec.setdefault("method", {})["drift"] = copy.deepcopy(donor["method"]["drift"])
    failure = error_cause(rec.pop("drift_error", None)) or "no cause recorded"
    rec.update(drift_ok=donor["drift_ok"], drift_violations=list(donor.get("drift_violations") or []))
    where = f"round {donor['round'] + 1}" if isinstance(donor.get("round"), int) else "an earlier round"  # 1-based
    rec["labels"] = [*rec.get("labels", []), f"drift: {where}'s figures (the latest round's drift failed: "
                     f"{clip(failure, 200)})"]


def _pooled_summary(values: list[float], per_round: list[Any]) -> dict[str, Any]:
    """The summary of the pooled repetitions; its interval widened to every round's median."""
    summary = summarize(values)
    medians = [s["p50"] for s in per_round if isinstance(s, dict) and _number(s.get("p50"))]
    if medians and "ci95_p50" in summary:
        low, high = summary["ci95_p50"]
        summary["ci95_p50"] = [min(low, *medians), max(high, *medians)]
    return summary


def _flat(values: list[Any]) -> list[float]:
    """Per-repetition values; a repetition holding a list (inter-token gaps) adds all of them."""
    return [float(y) for x in values for y in (x if isinstance(x, list) else [x])]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
