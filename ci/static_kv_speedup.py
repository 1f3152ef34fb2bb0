"""Print, per model, the static-KV CUDA-graph decode rate against eager bf16 (the README's GPU target).

Usage: ``python ci/static_kv_speedup.py RUN_DIR``. Target on ``synthetic:llama-1b`` bf16,
batch 1: decode tokens/s at least 3x eager bf16's and a roofline fraction of at least 0.3.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.results import read_records

EAGER, GRAPHS = "bf16", "static-kv-bf16-cudagraphs"
TARGET_SPEEDUP, TARGET_ROOFLINE = 3.0, 0.3


def lines(records: list[dict]) -> list[str]:
    out = ["", "## Static KV cache + CUDA-graph decode step vs eager bf16", "",
           "| model | b/p/n | eager tok/s | graphs tok/s | speedup | roofline | compile+capture s | graph skips "
           "| target |",
           "|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["variant"], r["device"], str(r["scenario"])): r for r in records}
    for (model, variant, device, scenario), graphs in sorted(by_key.items()):
        if variant != GRAPHS:
            continue
        eager = by_key.get((model, EAGER, device, scenario))
        s = graphs["scenario"]
        shape = f"{s.get('batch_size')}/{s.get('prompt_tokens')}/{s.get('new_tokens')}"
        if graphs["status"] != "ok" or not eager or eager["status"] != "ok":
            why = graphs.get("error") or "no ok eager bf16 cell to compare with"
            out.append(f"| {model} | {shape} | - | - | - | - | - | - | {graphs['status']}: "
                       f"{why.splitlines()[-1][:80]} |")
            continue
        g, e = graphs["metrics"]["decode_tokens_per_s"], eager["metrics"]["decode_tokens_per_s"]
        roof = graphs["metrics"].get("roofline_fraction")
        compile_s = graphs["timing_s"].get("compile_and_capture")
        skips = (graphs["method"].get("compiled_decode_step") or {}).get("cudagraph_skips", "-")
        met = g / e >= TARGET_SPEEDUP and roof is not None and roof >= TARGET_ROOFLINE
        out.append(f"| {model} | {shape} | {e:.1f} | {g:.1f} | {g / e:.2f}x | "
                   f"{'-' if roof is None else f'{roof:.3f}'} | {'-' if compile_s is None else f'{compile_s:.1f}'} | "
                   f"{skips} | "
                   f"{'met' if met else 'not met'} (>= {TARGET_SPEEDUP:g}x, >= {TARGET_ROOFLINE:g}) |")
    return out


if __name__ == "__main__":
    print("\n".join(lines(read_records(Path(sys.argv[1])))))
