"""Combine shard runs of one matrix into a single run directory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.results import RUN, append_record, read_records, read_run, utc_now, write_json_atomic
from optimize.atomic import build_dir_atomically
from optimize.errors import InputError
from optimize.libraries import libraries

# Environment facts that must agree for shard figures to be comparable.
COMPATIBLE_KEYS = ("cpu_model", "cpu_logical_cores")
COMPATIBLE_LIBRARIES = libraries("compatible")


def _fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    libs = env.get("libraries", {})
    return {
        **{k: env.get(k) for k in COMPATIBLE_KEYS},
        "gpus": sorted(g.get("name", "") for g in env.get("gpus", [])),
        **{f"lib:{k}": libs.get(k) for k in COMPATIBLE_LIBRARIES},
    }


def merge_runs(run_dirs: list[Path], out: Path, allow_env_mismatch: bool = False) -> dict[str, Any]:
    """Merge shard runs; refuses different matrices, and incompatible environments unless allowed.

    Allowed differences (hosted CI runners of one label often differ in CPU model) are
    recorded in the merged run.json as ``environment_differences``, which ``compare`` reports.
    Roofline ceilings measured differently by the runs are recorded too (``merged_ceilings``), apart:
    they change no timing the gate compares, only which ceiling each record's fractions are of.
    """
    if not run_dirs:
        raise InputError("merge needs at least one run directory")
    runs = []
    for d in run_dirs:
        runs.append(read_run(d))  # a missing or corrupt run.json is an InputError naming it
    out = Path(out)
    first = runs[0]
    differences: list[str] = []
    for d, run in zip(run_dirs[1:], runs[1:], strict=True):
        if run.get("matrix_hash") != first.get("matrix_hash"):
            raise InputError(f"{d} ran a different matrix ({run.get('matrix_hash')}) than {run_dirs[0]} "
                             f"({first.get('matrix_hash')}): refusing to merge")
        a, b = _fingerprint(first.get("environment") or {}), _fingerprint(run.get("environment") or {})
        diff = sorted(k for k in a if a[k] != b[k])
        differences += [f"{d}: {k} is {b[k]!r}, {a[k]!r} in {run_dirs[0]}" for k in diff]
        if diff and not allow_env_mismatch:
            k = diff[0]
            raise InputError(f"{d} ran in an incompatible environment: {k} is {b[k]!r} there, {a[k]!r} in "
                             f"{run_dirs[0]}: refusing to merge")
    if (out / RUN).exists():
        raise InputError(f"--out {out} already holds a run")
    for d in run_dirs:
        if out.resolve().is_relative_to(Path(d).resolve()):
            raise InputError(f"--out {str(out)!r} lies in {str(d)!r}, a run it merges: choose a folder outside "
                             "every run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty directory")
    # Built in a temporary sibling and renamed into place: a failed merge leaves no partial output.
    info: dict[str, Any] = {}
    missing = missing_shards(runs)
    kept = _kept_records(run_dirs)  # read (and an overlap refused) before anything is created
    try:
        build_dir_atomically(out, lambda tmp: info.update(_write_merged(run_dirs, runs, kept, tmp, differences,
                                                                         missing)))
    except OSError as exc:  # only the output is written from here on: a folder that refuses it, a full disk
        raise InputError(f"--out {out}: cannot write the merged run there ({exc.strerror or exc})") from None
    if not (out / RUN).exists():
        raise InputError(f"--out {out} was filled by another process during the merge")
    return {"cells": info["cells"], "out": str(out), "missing_shards": missing,
            "unfinished": [str(d) for d, r in zip(run_dirs, runs, strict=True) if not r.get("ended")],
            "roofline_differences": info["roofline_differences"]}


# The measured figures a record's fractions divide by (``bench.metrics.roofline.cell_roofline``), by path in
# a device's ceilings: the copy bandwidth, and each dtype's matmul rate.
# (``compare`` sets two runs' side by side with these too.)
def ceiling_figures(ceilings: Any) -> dict[str, Any]:
    def table(x: Any) -> dict[str, Any]:
        return x if isinstance(x, dict) else {}

    ceilings = table(ceilings)
    figures = {"memory.bandwidth_gbps": table(ceilings.get("memory")).get("bandwidth_gbps")}
    for dtype, m in sorted(table(ceilings.get("matmul")).items()):
        figures[f"matmul.{dtype}.tflops"] = table(m).get("tflops")
    return figures


def ceiling_label(path: str) -> tuple[str, str]:
    """A ``ceiling_figures`` path in words, with its unit: ("copy bandwidth", "GB/s"), ("float32 matmul", "TFLOP/s")."""
    if path.startswith("memory."):
        return "copy bandwidth", "GB/s"
    dtype = path[7:-7]  # "matmul.<dtype>.tflops"
    return f"{dtype} matmul", "TOP/s" if dtype == "int8" else "TFLOP/s"  # int8: operations, not FLOPs


# Ceilings measured within this of each other are one machine's noise (two measurements are never equal);
# ``compare`` flags ceilings beyond its speed threshold, 5% by default, likewise.
CEILING_TOLERANCE = 0.05


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def ceiling_difference(path: str, theirs: Any, ours: Any) -> str | None:
    """'copy bandwidth 20.5 GB/s, 15.9' with the change, where two runs' figures differ beyond CEILING_TOLERANCE
    (or one is missing); None where they agree.
    """
    name, unit = ceiling_label(path)
    if _number(theirs) and _number(ours):
        if abs(ours / theirs - 1) <= CEILING_TOLERANCE:
            return None
        return f"{name} {ours:.4g} {unit} ({ours / theirs - 1:+.1%}), {theirs:.4g}"
    if theirs == ours:
        return None
    return f"{name} {ours if _number(ours) else 'not measured'}, {theirs if _number(theirs) else 'not measured'}"


def merged_ceilings(run_dirs: list[Path], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the merged run.json says of the runs' roofline ceilings.

    Each run measured its own, and each record's fractions are of its own run's (the record keeps
    them as ``metrics.roofline_ceilings``), so one ``roofline`` cannot stand for every cell:

    - ``roofline``: per device, the ceilings of the first run that measured it (what the report shows
      and a resume of the merged run reuses);
    - ``shard_rooflines``: every run's ceilings, with its directory and shard;
    - ``roofline_differences``: one line per figure a run measured beyond ``CEILING_TOLERANCE`` from the
      first run that measured that device, as ``environment_differences`` has them; left out when none is.

    A device a run has no ceilings for gives its cells no fractions: no difference.
    """
    first: dict[str, tuple[Path, dict[str, Any]]] = {}
    differences: list[str] = []
    for d, run in zip(run_dirs, runs, strict=True):
        for device, ceilings in sorted((run.get("roofline") or {}).items()):
            if device not in first:
                first[device] = (d, ceilings)
                continue
            where, theirs = first[device]
            a, b = ceiling_figures(theirs), ceiling_figures(ceilings)
            said = (ceiling_difference(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)))
            differences += [f"{d}: {device} {line} in {where}" for line in said if line]
    return {**({"roofline": {device: c for device, (_, c) in first.items()}} if first else {}),
            "shard_rooflines": [{"run": str(d), "shard": r.get("shard"), "roofline": r.get("roofline")}
                                for d, r in zip(run_dirs, runs, strict=True)],
            **({"roofline_differences": differences} if differences else {})}


def missing_shards(runs: list[dict[str, Any]]) -> list[str]:
    """The shards I/N of the runs' N that none of them ran (runs of a whole matrix, or of mixed N: none)."""
    from bench.orchestrate import Shard

    try:
        shards = [Shard.parse(str(r.get("shard") or "")) for r in runs]
    except InputError:  # a run of a whole matrix: no shard to count against
        return []
    counts = {s.count for s in shards}
    if len(counts) != 1:
        return []
    (n,) = counts
    have = {s.index for s in shards}
    return [str(Shard(i, n)) for i in range(1, n + 1) if i not in have]


def _kept_records(run_dirs: list[Path]) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Cell id -> (the run whose records the merged run keeps, those records); shards that overlap are refused."""
    # A cell in two runs: the one where it ran ok wins (a retried cell merged beside its failed shard);
    # ok in both means the shards overlap. Otherwise the first run's records stay. Every record of the
    # chosen run is kept: a cell measured in rounds keeps all of them.
    kept: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for d in run_dirs:
        mine: dict[str, list[dict[str, Any]]] = {}
        # strict: a complete line that is not a record is refused, not left out of a run that would look whole
        try:
            found = read_records(d, latest_only=False, strict=True)
        except InputError as exc:
            raise InputError(f"{exc}: refusing to merge (the merged run would lack that line's cell)") from None
        for record in found:
            mine.setdefault(record["cell_id"], []).append(record)
        for cid, records in mine.items():
            if cid in kept:
                where, other = kept[cid]
                if not any(r["status"] == "ok" for r in records):
                    continue
                if any(r["status"] == "ok" for r in other):
                    raise InputError(f"cell {cid} ran ok in both {where} and {d}: shards overlap")
            kept[cid] = (d, records)
    return kept


def _write_merged(run_dirs: list[Path], runs: list[dict[str, Any]], kept: dict[str, tuple[Path, list[dict[str, Any]]]],
                  out: Path, differences: list[str], missing: list[str]) -> dict[str, Any]:
    for _, records in kept.values():
        for record in records:
            append_record(out, record)
    first = runs[0]
    starts = [r["started"] for r in runs if r.get("started")]
    ceilings = merged_ceilings(run_dirs, runs)
    merged = {**first, **ceilings, "shard": None, "merged_from": [str(d) for d in run_dirs],
              "shards": [r.get("shard") for r in runs],
              # a shard that never ended leaves the merged run unfinished (its reports say so)
              "started": min(starts) if starts else None,
              "ended": max(r["ended"] for r in runs) if all(r.get("ended") for r in runs) else None,
              "merged_at": utc_now(),
              **({"environment_differences": differences} if differences else {}),
              **({"missing_shards": missing} if missing else {})}
    write_json_atomic(out / RUN, merged)
    return {"cells": len(kept), "roofline_differences": ceilings.get("roofline_differences", [])}
