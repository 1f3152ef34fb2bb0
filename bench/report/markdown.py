"""A Markdown report of one run: environment, ceilings, one row per cell, notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results import read_records, read_run
from bench.summary import HEADER, summary_rows


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown_report(run_dir: Path) -> str:
    run = read_run(run_dir)
    records = read_records(run_dir)
    env = run.get("environment", {})
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "none"
    libs = env.get("libraries", {})
    lines = [
        f"# infermatrix run `{run['matrix']['name']}`",
        "",
        f"- started {run.get('started')}, ended {run.get('ended')}; launcher {run.get('launcher')}"
        + (f", shard {run['shard']}" if run.get("shard") else ""),
        f"- CPU {env.get('cpu_model')} ({env.get('cpu_logical_cores')} logical cores), "
        f"RAM {_fmt((env.get('ram_bytes') or 0) / 2**30, '.1f')} GiB, GPUs: {gpus}",
        "- " + ", ".join(f"{k} {libs[k]}" for k in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu",
                                                   "bitsandbytes", "torchao") if k in libs),
        f"- git {((env.get('git') or {}).get('commit') or '?')[:12]}"
        + (" (dirty)" if (env.get("git") or {}).get("dirty") else ""),
    ]
    for device, c in (run.get("roofline") or {}).items():
        rates = ", ".join(f"{d} {m['tflops'] * 1e3:.0f} GFLOP/s" for d, m in c["matmul"].items())
        lines.append(f"- {device} ceilings: copy {c['memory']['bandwidth_gbps']:.1f} GB/s; matmul {rates}")
    lines += ["", "| " + " | ".join(HEADER + ["BW GB/s", "roofline"]) + " |",
              "|" + "---|" * (len(HEADER) + 2)]
    for r, row in zip(records, summary_rows(records), strict=True):
        m = r.get("metrics", {})
        row += [_fmt(m.get("decode_bandwidth_gbps"), ".2f"), _fmt(m.get("roofline_fraction"), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in records:
        name = f"{r['model']} / {r['variant']} / {r['device']}"
        if r["status"] != "ok":
            notes.append(f"- {name}: **{r['status']}**: {(r.get('error') or '').splitlines()[0][:300]}")
        for label in r.get("labels", []):
            notes.append(f"- {name}: {label}")
        if r.get("drift_violations"):
            notes.append(f"- {name}: drift over budget: {'; '.join(r['drift_violations'])}")
        if r.get("drift_error"):
            notes.append(f"- {name}: drift failed: {r['drift_error'].splitlines()[-1][:300]}")
    if notes:
        lines += ["", "## Notes", "", *dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"
