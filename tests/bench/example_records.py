"""Real records of the default run as its cells wrote them, and as cells that stopped after fewer
repetitions would have written them: real-shaped records for report, select and summary tests.

They are a frozen copy (``data/example_records.jsonl``: the default run of 2026-11-30, fp32 at 177
tok/s, bf16 tied with it within noise), so the tests built on their figures do not move when
``reports/example`` is measured again; the tests of ``reports/example`` itself read that directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from bench.metrics.drift_config import DriftBudget
from bench.metrics.load import noise_mark
from bench.stats import summarize

EXAMPLE = Path(__file__).resolve().parents[2] / "reports" / "example"

# Samples kept per repetition (bench/scenarios/generate.py); itl_ms holds a list of token gaps per repetition.
PER_REPETITION = ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms", "prefill_tokens_per_s", "decode_tokens_per_s")


FROZEN = Path(__file__).resolve().parent / "data" / "example_records.jsonl"


def example_records() -> list[dict[str, Any]]:
    """The frozen default run's records, one dict per line."""
    return [json.loads(line) for line in FROZEN.read_text(encoding="utf-8").splitlines()]


def example_record(variant: str) -> dict[str, Any]:
    return next(r for r in example_records() if r["variant"] == variant)


def first_repetitions(record: dict[str, Any], k: int) -> dict[str, Any]:
    """``record`` as its cell would have written it had it stopped after its first ``k`` repetitions.

    The samples are cut to ``k`` and every figure taken from them computed again as the generate scenario
    computes it (summaries, median rates), the roofline figures (linear in the rates) scaled with them and
    the noise mark taken again; memory and drift, measured once per cell, stay as they are.
    """
    rec = copy.deepcopy(record)
    s, m = rec["samples"], rec["metrics"]
    for key in PER_REPETITION:
        s[key] = s[key][:k]
    decode, prefill = summarize(s["decode_tokens_per_s"]), summarize(s["prefill_tokens_per_s"])
    for key, rate, old in (("decode_bandwidth_gbps", decode["p50"], m["decode_tokens_per_s"]),
                           ("roofline_fraction", decode["p50"], m["decode_tokens_per_s"]),
                           ("prefill_tflops", prefill["p50"], m["prefill_tokens_per_s"]),
                           ("prefill_flops_fraction", prefill["p50"], m["prefill_tokens_per_s"])):
        if key in m:
            m[key] *= rate / old
    m.update(ttft_ms=summarize(s["ttft_ms"]), tpot_ms=summarize(s["tpot_ms"]), e2e_ms=summarize(s["e2e_ms"]),
             itl_ms=summarize([x for rep in s["itl_ms"] for x in rep]), prefill_tokens_per_s=prefill["p50"],
             decode_tokens_per_s=decode["p50"], decode_tokens_per_s_summary=decode)
    repeat = rec["method"]["repeat"]
    repeat.update(min_reps=k, max_reps=k)
    rec.pop("noisy", None)
    rec.pop("noise", None)
    rec.update(noise_mark(s, repeat["target_rel_ci"]))
    return rec


def under_drift_budget(record: dict[str, Any], budget: DriftBudget) -> dict[str, Any]:
    """``record`` as its cell would have written it under the matrix's drift ``budget``: the budget checks the
    drift figures and the record states the limits broken (``bench.metrics.drift_cell``, ``bench.cell``).
    """
    rec = copy.deepcopy(record)
    violations = budget.check(rec["metrics"])
    rec.update(drift_ok=not violations, drift_violations=violations)
    return rec


# Metrics the drift measurement adds beside those of kind "drift" (bench.metrics.drift_cell).
DRIFT_INFO = ("drift_meaningful", "drift_through_cache", "drift_wall_s", "scored_tokens")


def with_drift_failed(record: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """``record`` as its cell would have written it had the drift measurement raised ``exc``: no drift figures
    or method, ``drift_ok`` false and the traceback's tail in ``drift_error`` (``bench.cell``).
    """
    from bench.catalogue import METRICS
    from bench.cell import error_tail

    rec = copy.deepcopy(record)
    rec["metrics"] = {k: v for k, v in rec["metrics"].items()
                      if k not in DRIFT_INFO and (k not in METRICS or METRICS[k].kind != "drift")}
    rec["method"].pop("drift", None)
    rec.pop("drift_violations", None)
    rec.update(drift_ok=False, drift_error=error_tail(exc))
    return rec
