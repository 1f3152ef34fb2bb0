"""Export a run to the formats teams already chart benchmarks with.

- ``pytest-benchmark``: the JSON that ``pytest --benchmark-json`` writes and ``pytest-benchmark
  compare`` loads. Each ok cell gives one benchmark per latency (TTFT, TPOT, e2e) with the
  per-repetition samples, in seconds as pytest-benchmark expects; statistics are computed by
  pytest-benchmark's own ``Stats`` so every field means what it means there.
- ``github-action-benchmark``: the ``customSmallerIsBetter`` or ``customBiggerIsBetter`` list
  of ``{"name", "unit", "value", "range", "extra"}``; which metrics go in which list follows
  the catalogue's direction.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any, Literal

from bench.catalogue import METRICS, interval, interval_coverage, point
from bench.results import read_run, recorded_revision
from bench.rounds import read_cell_records
from optimize.errors import InputError

LATENCIES = ("ttft_ms", "tpot_ms", "e2e_ms")
TARGETS = ("pytest-benchmark", "github-action-benchmark")
# What a chart of the run should hold: the figures a regression would show in (not the bookkeeping).
ACTION_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_tokens_per_s", "prefill_tokens_per_s",
                  "peak_memory_bytes", "weights_bytes", "kld_mean", "ppl_ratio", "top1_agreement")


def _scenario_text(r: dict[str, Any]) -> str:
    s = r["scenario"]
    return f"{s['name']}:{s['batch_size']}/{s['prompt_tokens']}/{s['new_tokens']}"


def pytest_benchmark_json(run_dir: Path) -> dict[str, Any]:
    """The run as pytest-benchmark's saved JSON (format of pytest-benchmark 4 and 5)."""
    from pytest_benchmark import __version__ as pb_version
    from pytest_benchmark.stats import Stats

    run = read_run(run_dir)
    env = run.get("environment", {})
    benchmarks = []
    for r in read_cell_records(run_dir, run):  # a cell measured in rounds: one benchmark of all its repetitions
        if r["status"] != "ok":
            continue
        for key in LATENCIES:
            data = [v / 1e3 for v in (r.get("samples") or {}).get(key) or [] if isinstance(v, (int, float))]
            if not data:
                continue
            stats = Stats()
            for d in data:
                stats.update(d)
            s = r["scenario"]
            group = f"{key} {r['model']} {r['device']} {_scenario_text(r)}"
            name = f"{key}[{r['variant']}]"
            benchmarks.append({
                "group": group, "name": name,
                "fullname": f"infermatrix/{r['model']}/{r['device']}/{_scenario_text(r)}::{name}",
                "params": {"variant": r["variant"], "device": r["device"], "batch_size": s["batch_size"],
                           "prompt_tokens": s["prompt_tokens"], "new_tokens": s["new_tokens"]},
                "param": r["variant"],
                "extra_info": {"cell_id": r["cell_id"], "metric": key, "unit": "s",
                               "decode_tokens_per_s": point(r, "decode_tokens_per_s"),
                               "kld_mean": point(r, "kld_mean"), "peak_memory_bytes": point(r, "peak_memory_bytes")},
                "options": {"disable_gc": False, "timer": (r.get("method") or {}).get("clock", "perf_counter"),
                            "min_rounds": (r.get("method") or {}).get("repeat", {}).get("min_reps"),
                            "max_time": (r.get("method") or {}).get("repeat", {}).get("budget_s"),
                            "min_time": 0, "warmup": bool((r.get("method") or {}).get("repeat", {}).get("warmup"))},
                "stats": {**stats.as_dict(), "data": data, "iterations": 1},
            })
    revision = recorded_revision(run)
    return {
        # The measuring machine's, as run.json recorded them ("" where a run predates a field): never this host's.
        "machine_info": {"node": env.get("hostname", ""), "processor": env.get("cpu_model", ""),
                         **{k: env.get(k) or "" for k in ("machine", "system", "release", "python_implementation",
                                                          "python_compiler")},
                         "python_version": env.get("python", ""),
                         "cpu": {"brand_raw": env.get("cpu_model", ""), "count": env.get("cpu_logical_cores")},
                         "gpus": [g.get("name") for g in env.get("gpus", [])]},
        # The revision measured (an ab side's, the user's repository's); commit times are not recorded.
        "commit_info": {"id": revision["commit"] or "", "dirty": bool(revision["dirty"]), "project": "infermatrix",
                        "branch": (run.get("ab") or {}).get("rev") or "", "time": "", "author_time": ""},
        "benchmarks": benchmarks,
        "datetime": run.get("ended") or run.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": pb_version,
    }


def _interval_label(record: dict[str, Any], key: str) -> str | None:
    """How sure the metric's interval is: "95% CI" when it reaches that level, else its true coverage.

    None when the interval covers nothing (a single repetition gives [x, x]): no range to chart.
    """
    cov = interval_coverage(record, key)
    if cov is None or cov >= 0.95:
        return "95% CI"
    if cov <= 0:
        return None
    return f"{math.floor(cov * 100)}% CI"


def github_action_benchmark(run_dir: Path, direction: Literal["smaller", "bigger"]) -> list[dict[str, Any]]:
    """The run as github-action-benchmark's customSmallerIsBetter / customBiggerIsBetter list."""
    if direction not in ("smaller", "bigger"):
        raise InputError(f"--direction must be smaller or bigger, got {direction!r}")
    want = "lower" if direction == "smaller" else "higher"
    out = []
    for r in read_cell_records(run_dir, read_run(run_dir)):
        if r["status"] != "ok":
            continue
        for key in ACTION_METRICS:
            m = METRICS[key]
            value = point(r, key)
            if m.direction != want or value is None:
                continue
            entry = {"name": f"{r['variant']} [{r['model']} {r['device']} {_scenario_text(r)}] {m.label}",
                     "unit": m.shown_unit, "value": value * m.scale}
            extra = f"cell {r['cell_id']}; p50 over repetitions" if m.shape == "summary" or m.ci_key \
                else f"cell {r['cell_id']}"
            ci, label = interval(r, key), _interval_label(r, key)
            if ci is not None and label is not None:
                entry["range"] = f"{label} [{m.format(ci[0])}, {m.format(ci[1])}]"
            elif ci is not None or interval_coverage(r, key) == 0:
                extra += "; one repetition: no interval"
            entry["extra"] = extra
            out.append(entry)
    return out
