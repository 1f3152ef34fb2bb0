"""Compare two run directories cell by cell: the regression gate's verdicts.

Cells are matched by identity (model, variant name, device, scenario), so a recipe whose
steps changed between two revisions is still the same cell. Every gated metric of every
matched cell gets the head/base ratio of medians with a block bootstrap interval, a
Mann-Whitney U test on the raw repetitions, Benjamini-Hochberg correction over all the
comparisons, a verdict and the minimum detectable effect (see ``bench.gate_stats``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import gate_stats as gs
from bench.cells import identity
from bench.results import read_records, read_run, require_run_dir
from optimize.errors import InputError, clip
from optimize.libraries import libraries


@dataclass(frozen=True)
class GatedMetric:
    key: str
    label: str
    unit: str
    direction: str  # "lower" or "higher" is better
    kind: str  # "speed" or "memory"


# The gated metrics: latency and throughput with raw per-repetition samples, and peak memory.
GATED = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_tokens_per_s", "prefill_tokens_per_s", "peak_memory_bytes")


def gated_metrics() -> tuple[GatedMetric, ...]:
    """The metrics the gate checks, with label, unit, direction and kind from the metric catalogue."""
    from bench.catalogue import metric

    return tuple(GatedMetric(k, m.label, m.unit, m.direction, m.kind) for k in GATED for m in (metric(k),))


# A verdict is withheld when the side it blames ran while other processes used this much more
# of the machine's CPUs than during the other side's run of the same cell.
LOAD_MARGIN = 0.25

# Environment facts that make speed figures incomparable when they differ.
ENV_KEYS = ("cpu_model", "cpu_logical_cores", "cpu_affinity")
ENV_LIBRARIES = libraries("compare")


def environment_fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    libs = env.get("libraries", {})
    torch_env = env.get("torch") or {}
    return {
        **{k: env.get(k) for k in ENV_KEYS},
        "gpus": sorted(g.get("name", "") for g in env.get("gpus", [])),
        "gpu driver": sorted({g.get("driver", "") for g in env.get("gpus", [])}),
        "torch threads": torch_env.get("num_threads"),
        **{f"env {k}": v for k, v in sorted(env.get("env_vars", {}).items()) if k.endswith("_THREADS")},
        **{k: libs.get(k) for k in ENV_LIBRARIES},
    }


def environment_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(fact, before, after) for each environment fact the gate compares that differs between the two."""
    a, b = environment_fingerprint(before), environment_fingerprint(after)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def environment_diffs(base: dict[str, Any], head: dict[str, Any]) -> list[str]:
    """One line per environment fact that differs between the two runs."""
    return [f"{k}: {a!r} in base, {b!r} in head" for k, a, b in environment_changes(base, head)]


def _ceilings(run: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """(device, figure, unit) -> value of the roofline ceilings a run.json holds (positive numbers only)."""
    from bench.merge import ceiling_figures, ceiling_label

    return {(device, *ceiling_label(path)): float(v) for device, c in sorted((run.get("roofline") or {}).items())
            for path, v in ceiling_figures(c).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def ceiling_pairs(base_run: dict[str, Any], head_run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each roofline ceiling both runs measured (at their start): device, figure, unit, base, head, ratio.

    The ceilings are the machine's own speed (copy bandwidth, matmul throughput) measured with no model:
    where they differ between two runs, every cell's figures move with the machine, whatever the code did.
    """
    b, h = _ceilings(base_run), _ceilings(head_run)
    return [{"device": k[0], "figure": k[1], "unit": k[2], "base": b[k], "head": h[k], "ratio": h[k] / b[k]}
            for k in sorted(set(b) & set(h))]


def cell_key(record: dict[str, Any]) -> str:
    """The identity two runs' cells are matched on: ``bench.cells.identity`` of the record."""
    return identity(record["model"], record["variant"], record["device"], record["scenario"])


@dataclass
class Side:
    """One run's records grouped by cell: every ok record (rounds, A/B repeats) and the failures."""

    run_dir: Path
    run: dict[str, Any]
    ok: dict[str, list[dict[str, Any]]]
    not_ok: dict[str, dict[str, Any]]

    @property
    def keys(self) -> set[str]:
        return set(self.ok) | set(self.not_ok)


def load_side(run_dir: Path) -> Side:
    run_dir = Path(run_dir)
    require_run_dir(run_dir)
    ok: dict[str, list[dict[str, Any]]] = defaultdict(list)
    not_ok: dict[str, dict[str, Any]] = {}
    for record in read_records(run_dir, latest_only=False):
        key = cell_key(record)
        if record["status"] == "ok":
            ok[key].append(record)
        else:
            not_ok[key] = record
    for key in ok:
        not_ok.pop(key, None)  # a cell that ran ok at least once is judged on its ok records
    if not ok and not not_ok:
        raise InputError(f"{run_dir} holds no cell records")
    return Side(run_dir, read_run(run_dir), dict(ok), not_ok)


def _recorded_in_neither(base: Side, head: Side) -> list[str]:
    """Cells a run's matrix holds that neither run recorded (both stopped before them): never gated, so
    listed with the unmatched ones. Runs whose run.json cannot say which cells they hold add none.
    """
    from bench.orchestrate import unrecorded_cells

    holders: dict[str, list[str]] = defaultdict(list)
    recorded = base.keys | head.keys
    for name, s in (("base", base), ("head", head)):
        records = [r for recs in s.ok.values() for r in recs] + list(s.not_ok.values())
        for cell in unrecorded_cells(s.run, records) or []:
            if cell.key not in recorded:
                holders[cell.key].append(name)
    where = {("base",): "base's matrix", ("head",): "head's matrix", ("base", "head"): "both matrices"}
    return [f"{k} (in {where[tuple(holders[k])]}, recorded in neither run)" for k in sorted(holders)]


def metric_blocks(records: list[dict[str, Any]], key: str) -> list[list[float]] | None:
    """One block per record: the raw repetitions, or the single figure of a per-process metric."""
    blocks = []
    for r in records:
        raw = r.get("samples", {}).get(key)
        if raw is None and isinstance(r.get("metrics", {}).get(key), (int, float)):
            raw = [r["metrics"][key]]
        if not raw:
            return None
        blocks.append([float(x) for x in raw])
    return blocks


@dataclass
class Row:
    cell: str
    metric: str
    label: str
    unit: str
    direction: str
    kind: str
    verdict: str = "inconclusive"  # until compare_sides judges the row
    n_base: int = 0
    n_head: int = 0
    blocks_base: int = 0
    blocks_head: int = 0
    base_median: float | None = None
    head_median: float | None = None
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    q: float | None = None
    threshold: float = 0.0
    cv: float | None = None
    process_sd: float | None = None  # sd of a whole process's log level beyond its repetitions (pooled over cells)
    process_df: int | None = None  # degrees of freedom of that estimate (and of the t test on process levels)
    p_rank: float | None = None  # Mann-Whitney U on the repetitions
    p_process: float | None = None  # t test on the processes' levels; p is the larger of the two
    mde: float | None = None
    note: str = ""


@dataclass
class Comparison:
    base: str
    head: str
    config: dict[str, Any]
    env_diffs: list[str]
    env_mismatch_allowed: bool
    rows: list[Row] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    load: dict[str, float | None] = field(default_factory=dict)  # median share of CPU other processes used
    hosts: dict[str, list[str]] = field(default_factory=dict)  # the hosts each side's ok records name
    ceilings: list[dict[str, Any]] = field(default_factory=list)  # each run's roofline ceilings, side by side
    same_run: str | None = None  # why BASE and HEAD are one run ("one directory", "copies of one run"), else None

    @property
    def regressed(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "regressed"]

    def exit_code(self) -> int:
        return 1 if self.regressed else 0

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["rows"] = [{k: _clean(v) if isinstance(v, float) else v for k, v in r.items()} for r in d["rows"]]
        d["exit_code"] = self.exit_code()
        d["counts"] = {v: sum(r.verdict == v for r in self.rows) for v in gs.VERDICTS}
        return json.dumps(d, indent=1, allow_nan=False)


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def compare_sides(base: Side, head: Side, cfg: gs.GateConfig = gs.GateConfig(), *,
                  allow_env_mismatch: bool = False, allow_unmatched: bool = False) -> Comparison:
    """All verdicts for two loaded runs; raises InputError on unmatched cells or missing samples."""
    cfg.validate()
    diffs = environment_diffs(base.run.get("environment", {}), head.run.get("environment", {}))
    for name, s in (("base", base), ("head", head)):
        diffs += [f"{name} mixes environments (merged shards or a resume elsewhere): {d}" for d in
                  s.run.get("environment_differences", [])]
    out = Comparison(str(base.run_dir), str(head.run_dir), dataclasses.asdict(cfg), diffs, allow_env_mismatch)
    out.load = {name: _other_cpu([r for recs in s.ok.values() for r in recs])
                for name, s in (("base", base), ("head", head))}
    out.hosts = {name: sorted({r["host"] for recs in s.ok.values() for r in recs if isinstance(r.get("host"), str)})
                 for name, s in (("base", base), ("head", head))}
    out.ceilings = ceiling_pairs(base.run, head.run)
    neither = _recorded_in_neither(base, head)
    out.unmatched = [f"{k} (only in base)" for k in sorted(base.keys - head.keys)] + \
                    [f"{k} (only in head)" for k in sorted(head.keys - base.keys)] + neither
    if out.unmatched and not allow_unmatched:
        more = f"; and {len(out.unmatched) - 8} more" if len(out.unmatched) > 8 else ""
        how = "are not recorded in both runs" if neither else "are in only one run"
        raise InputError(f"{len(out.unmatched)} cells {how} (use --allow-unmatched to skip them): "
                         f"{'; '.join(out.unmatched[:8])}{more}")
    tested: list[Row] = []
    noise = _process_noise(base, head)
    for key in sorted(base.keys & head.keys):
        rows = _status_rows(key, base, head)
        if rows is not None:
            out.rows.extend(rows)
            continue
        for m in gated_metrics():
            b, h = metric_blocks(base.ok[key], m.key), metric_blocks(head.ok[key], m.key)
            if b is None and h is None:
                continue
            if b is None or h is None:
                side = "base" if b is None else "head"
                raise InputError(f"cell {key}: metric {m.key} has no samples in {side} "
                                 f"({base.run_dir if b is None else head.run_dir})")
            for side, blocks, run_dir in (("base", b, base.run_dir), ("head", h, head.run_dir)):
                if min(min(block) for block in blocks) <= 0:  # a ratio of medians needs positive figures
                    raise InputError(f"cell {key}: metric {m.key} has a value <= 0 in {side} ({run_dir}): "
                                     "no ratio can be formed; the record is not a measurement")
            row = _measure_row(key, m, b, h, cfg, noise.get((m.key, base.ok[key][0]["device"])))
            noisy = [s for s, recs in (("base", base.ok[key]), ("head", head.ok[key]))
                     if any(r.get("noisy") for r in recs)]
            if noisy:
                row.note = f"marked noisy in {' and '.join(noisy)}"
            out.rows.append(row)
            if row.p is not None:
                tested.append(row)
    if not out.rows:  # a gate that compared nothing must not pass
        both = base.keys & head.keys
        if both:  # recorded in both, ok in neither
            raise InputError(f"none of the {len(both)} cells recorded in both {base.run_dir} and {head.run_dir} "
                             "is ok in either (failed or skipped on both sides): nothing to compare")
        raise InputError(f"no cell is recorded in both {base.run_dir} and {head.run_dir} "
                         f"({len(out.unmatched)} in one run only): nothing to compare")
    for row, q in zip(tested, gs.bh_adjust([r.p for r in tested]), strict=True):
        row.q = q
    for row in out.rows:
        if row.ratio is None:
            continue
        row.verdict = gs.verdict(row.low, row.high, _significant(row, cfg), row.threshold, row.direction)
        if row.verdict in ("regressed", "improved") and diffs and not allow_env_mismatch:
            row.note = f"{row.verdict} withheld: environments differ"
            row.verdict = "inconclusive"
        elif row.verdict in ("regressed", "improved") and not allow_env_mismatch and \
                (how := method_difference(base.ok[row.cell], head.ok[row.cell], row.kind)):
            row.note = f"{row.verdict} withheld: measured differently ({how})"
            row.verdict = "inconclusive"
        elif row.verdict in ("regressed", "improved") and row.kind == "speed" and \
                min(row.blocks_base, row.blocks_head) < cfg.min_processes:
            row.note = (f"{row.verdict} withheld: {min(row.blocks_base, row.blocks_head)} process(es) on a side, "
                        f"{cfg.min_processes} needed to see noise between processes")
            row.verdict = "inconclusive"
        elif row.verdict in ("regressed", "improved") and not gs.beyond_mde(row.ratio, row.mde):
            between = f"; whole processes vary by {row.process_sd:.1%} (sd)" if row.process_sd else ""
            row.note = (f"{row.verdict} withheld: the change is smaller than the MDE ({row.mde:.1%}), the smallest "
                        f"change this noise lets the gate detect{between}")
            row.verdict = "inconclusive"
        elif row.verdict in ("regressed", "improved"):
            _check_load(row, base, head)
    return out


def _significant(row: Row, cfg: gs.GateConfig) -> bool:
    """The rank test's verdict after correction; for a row too small for the test (q None), peak memory's
    rule: one figure per process, significant when the two sides' ranges do not overlap (an interval of every
    pairing beyond the band already excludes 1). A speed row too small for the test is never significant:
    a few repetitions fall in any order by chance (all of 3 beyond all of 2 in one draw of 10).
    """
    if row.q is None:
        return row.kind == "memory"
    return row.q <= cfg.fdr


def _check_load(row: Row, base: Side, head: Side) -> None:
    """Withhold a speed verdict that the two sides' machine load could explain (recorded load only).

    Other processes using a share L of the CPUs keep all of them busy at most a share L of the
    time, so a single-threaded process that may run on every CPU waits at most that long: load
    slows it by at most 1 / (1 - L). A change beyond that factor by more than the threshold is
    more than the load could make, and stands with a note. The bound counts CPU time only (a
    neighbour on a sibling hyperthread, or sharing the memory bandwidth, slows a process only
    while it runs, which L counts). A multi-threaded cell gets none: each parallel region waits
    for its slowest thread, and one that a neighbour preempts stalls them all; nor does a run
    confined to some of the CPUs, where L, a share of them all, understates its own CPUs' load.
    """
    b, h = _other_cpu(base.ok[row.cell]), _other_cpu(head.ok[row.cell])
    if b is None or h is None or row.kind != "speed":
        return
    # The side that measured worse: head for a regression, base for an improvement.
    name, blamed, other = ("head", h, b) if row.verdict == "regressed" else ("base", b, h)
    if blamed - other <= LOAD_MARGIN:
        return
    load = f"the {name} side ran while other processes used {blamed:.0%} of the CPUs ({other:.0%} for the other side)"
    notes = [row.note] if row.note else []
    if blamed < 1 and _single_threaded(base.ok[row.cell] + head.ok[row.cell]) and _every_cpu(base, head):
        explained = 1 / (1 - blamed)
        size = row.low if row.low > 1 else 1 / row.high  # the interval's end nearest no change, as a factor
        if size > explained * (1 + row.threshold):
            row.note = "; ".join([*notes, f"{row.verdict} although {load}: that load explains at most "
                                          f"{explained:.2f}x, the change is at least {size:.2f}x"])
            return
    row.note = "; ".join([*notes, f"{row.verdict} withheld: {load}"])
    row.verdict = "inconclusive"


def _single_threaded(records: list[dict[str, Any]]) -> bool:
    """True when every record was measured with one intra-op thread (torch's, and ONNX Runtime's where used)."""
    methods = [r.get("method") or {} for r in records]
    return all(m.get("torch_threads") == 1 and m.get("ort_intra_op_threads", 1) == 1 for m in methods)


def _every_cpu(*sides: Side) -> bool:
    """True when each run could use every CPU of its machine (its recorded affinity is all its cores)."""
    envs = [side.run.get("environment") or {} for side in sides]
    return all(isinstance(e.get("cpu_affinity"), int) and e.get("cpu_affinity") == e.get("cpu_logical_cores")
               for e in envs)


def _other_cpu(records: list[dict[str, Any]]) -> float | None:
    """Median share of the CPUs other processes used while these records were measured (None: not recorded)."""
    import statistics

    shares = [x for r in records for x in [(r.get("load") or {}).get("other_cpu_fraction")]
              if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return statistics.median(shares) if shares else None


def _process_noise(base: Side, head: Side) -> dict[tuple[str, str], gs.ProcessNoise]:
    """Between-process noise of each speed metric per device, pooled over every cell of both runs.

    Two runs measured one after the other share no process: a machine that runs some processes
    slower than others (load, clocks) moves whole processes, which the rank test on pooled
    repetitions takes for a real change. ``gs.process_noise`` estimates that component from the
    processes of each cell in each run; each row's test and MDE then include it.
    """
    cell_sides: dict[tuple[str, str], list[list[list[float]]]] = defaultdict(list)
    speed = [m.key for m in gated_metrics() if m.kind == "speed"]
    for s in (base, head):
        for records in s.ok.values():
            for key in speed:
                blocks = metric_blocks(records, key)
                if blocks:
                    cell_sides[(key, records[0]["device"])].append(blocks)
    return {k: n for k, sides in cell_sides.items() for n in [gs.process_noise(sides)] if n is not None}


def _measure_row(key: str, m: GatedMetric, b: list[list[float]], h: list[list[float]], cfg: gs.GateConfig,
                 noise: gs.ProcessNoise | None = None) -> Row:
    """One metric of one cell; p stays None where too few samples for the rank test to reach ``fdr``.

    Those comparisons (peak memory, one figure per process) take the range of all pairings as
    their interval and count as significant only when the two sides' ranges do not overlap.
    ``noise`` (speed metrics): the pooled between-process noise; the row's p is then the larger of the
    rank test's and a t test's on the processes' levels (``gs.process_p``), and its MDE includes it.
    """
    import numpy as np

    pb, ph = gs.pooled(b), gs.pooled(h)
    tested = gs.min_rank_p(len(pb), len(ph)) <= cfg.fdr
    if tested:
        ratio, low, high = gs.ratio_interval(b, h, cfg.level, cfg.n_resamples, cfg.seed)
    else:
        ratio = float(np.median(ph) / np.median(pb))
        low, high = float(ph.min() / pb.max()), float(ph.max() / pb.min())
    cv = max(gs.robust_cv(b), gs.robust_cv(h))
    p_rank = gs.rank_p(b, h) if tested else None
    p_process = gs.process_p(b, h, noise) if tested and noise is not None else None
    return Row(cell=key, metric=m.key, label=m.label, unit=m.unit, direction=m.direction, kind=m.kind,
               n_base=len(pb), n_head=len(ph), blocks_base=len(b), blocks_head=len(h),
               base_median=float(np.median(pb)), head_median=float(np.median(ph)), ratio=ratio, low=low, high=high,
               p=None if p_rank is None else max(p_rank, p_process or 0.0), p_rank=p_rank, p_process=p_process,
               threshold=cfg.threshold(m.kind), cv=_clean(cv),
               process_sd=None if noise is None else math.sqrt(noise.var), process_df=noise and noise.df,
               mde=_clean(gs.mde(cv, len(pb), len(ph), cfg.level, cfg.power, cfg.fdr, noise and noise.var,
                                 (len(b), len(h)))))  # infinite when untested


# The record's words for how a kind of figure was taken; a change in them is a change of method, not of the code
# measured (a harness whose memory figures began counting the library pages a fresh process has resident).
METHOD_KEYS = {"speed": ("clock", "token_timestamps", "tpot"), "memory": ("memory",)}


def method_difference(base: list[dict[str, Any]], head: list[dict[str, Any]], kind: str) -> str | None:
    """The first ``method`` entry behind ``kind``'s figures that the two sides' records state differently."""
    for key in METHOD_KEYS.get(kind, ()):
        words = [{str((r.get("method") or {}).get(key)) for r in side} for side in (base, head)]
        if words[0] != words[1]:
            return f"method.{key}: {' / '.join(sorted(words[0]))!r} in base, {' / '.join(sorted(words[1]))!r} in head"
    return None


def _status_rows(key: str, base: Side, head: Side) -> list[Row] | None:
    """Rows for a cell that did not run ok on both sides; None when it did."""
    b_ok, h_ok = key in base.ok, key in head.ok
    if b_ok and h_ok:
        return None
    if not b_ok and not h_ok:
        return []  # failed or skipped on both sides: nothing to compare
    status = (head.not_ok if b_ok else base.not_ok)[key]
    lines = (status.get("error") or "").splitlines()
    first = lines[0] if lines else ""
    if b_ok and status["status"] == "failed":
        verdict, note = "regressed", f"ok in base, failed in head: {first}"
    else:
        verdict, note = "inconclusive", f"{status['status']} in {'head' if b_ok else 'base'}: {first}"
    return [Row(cell=key, metric="status", label="status", unit="", direction="", kind="status", verdict=verdict,
                note=clip(note, 300))]


def compare_runs(base_dir: Path, head_dir: Path, cfg: gs.GateConfig = gs.GateConfig(), **kwargs) -> Comparison:
    """Load two run directories and compare them (see ``compare_sides``); where they are one run (one
    directory, or copies of one run) the comparison says so: nothing can regress against itself, and a gate
    fed one run twice (a path variable set wrong) would pass every commit without a word.
    """
    from bench.results import run_identity

    base, head = load_side(base_dir), load_side(head_dir)
    out = compare_sides(base, head, cfg, **kwargs)
    if Path(base_dir).resolve() == Path(head_dir).resolve():
        out.same_run = "one directory"
    elif run_identity(base.run) is not None and run_identity(base.run) == run_identity(head.run):
        out.same_run = "copies of one run (the same start, host, matrix and revision)"
    return out
