"""The gate's Markdown summary: for a pull-request comment or ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

import math

from bench.compare import Comparison, Row
from bench.report.markdown import md_code
from bench.report.markdown import md_escape as _esc

FEW_DF = 4  # below it Student's t needs a change of 5.8 standard errors or more to reach p 0.01 (2 df: 9.9)

ICON = {"regressed": "❌ regressed", "improved": "✅ improved", "unchanged": "unchanged",
        "inconclusive": "❔ inconclusive"}


def _pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "∞" if math.isinf(x) else f"{x * 100:.1f}%"


def _change(x: float | None) -> str:
    return "-" if x is None else f"{(x - 1) * 100:+.1f}%"


def _value(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "bytes":
        return f"{x / 2**20:.1f} MiB"
    return f"{x:.4g} {unit}"


def _row(r: Row) -> str:
    if r.kind == "status":
        return f"| {_esc(r.cell)} | status | | | | | {ICON[r.verdict]} | | {_esc(r.note)} |"
    interval = f"[{_change(r.low)}, {_change(r.high)}]"
    q = "range" if r.q is None else f"{r.q:.2g}"
    better = "↓" if r.direction == "lower" else "↑"
    return (f"| {_esc(r.cell)} | {r.label} ({better}) "
            f"| {_value(r.base_median, r.unit)} → {_value(r.head_median, r.unit)} "
            f"| {_change(r.ratio)} | {interval} | {q} | {ICON[r.verdict]} | {_pct(r.mde)} (±{_pct(r.threshold)}) "
            f"| n={r.n_base}/{r.n_head} in {r.blocks_base}/{r.blocks_head} processes"
            f"{'; ' + _esc(r.note) if r.note else ''} |")


def markdown_summary(c: Comparison, show_all: bool = False) -> str:
    """Environment first, then counts, then the table (changed and inconclusive rows unless ``show_all``)."""
    cfg = c.config
    lines = ["## infermatrix regression gate", ""]
    if c.same_run:
        lines += [f"**BASE and HEAD are one run** ({c.same_run}): every figure is compared with itself, so "
                  "nothing can regress; check the paths the gate was given.", ""]
    if c.env_diffs:
        lead = "Environments differ (compared anyway: --allow-env-mismatch)" if c.env_mismatch_allowed else \
            "**Environments differ: no regression or improvement is called** (use --allow-env-mismatch to override)"
        lines += [f"{lead}:", "", *[f"- {_esc(d)}" for d in c.env_diffs], ""]
    counts = {v: sum(r.verdict == v for r in c.rows) for v in ICON}
    tally = ", ".join(f"{n} {v}" for v, n in counts.items())
    lines.append(f"base {md_code(c.base)} → head {md_code(c.head)}: {tally} of {len(c.rows)} comparisons. "
                 f"**Result: {'FAIL' if c.exit_code() else 'pass'}**")
    lines += ["", f"Ratio of medians head/base with a {cfg['level']:.0%} block-bootstrap interval; Mann-Whitney U "
                  "on the repetitions and a t test on the processes' levels (the larger p), "
                  f"Benjamini-Hochberg q ≤ {cfg['fdr']}; threshold ±{cfg['speed_threshold']:.0%} speed, "
                  f"±{cfg['memory_threshold']:.0%} memory. MDE: smallest change detectable at {cfg['power']:.0%} "
                  "power with the observed noise (a threshold below it reports noise, so such changes stay "
                  "inconclusive).", ""]
    single = sum(1 for r in c.rows if r.kind == "speed" and (r.blocks_base == 1 or r.blocks_head == 1))
    if single:
        verdicts = ("they give verdicts (--min-processes 1)" if cfg["min_processes"] <= 1
                    else "they give no verdict unless --min-processes 1")
        lines += [f"{single} speed comparisons have one process on a side: noise between processes (a "
                  f"neighbour's burst of load) is not seen in their intervals, so {verdicts}; "
                  "`[measure] rounds >= 2` or `infermatrix ab` measure it.", ""]
    few = min((r.process_df for r in c.rows if r.process_df is not None), default=None)
    if few is not None and few < FEW_DF:
        lines += [f"The noise between processes is estimated from {few} degrees of freedom: the t test on process "
                  "levels then calls only large changes. More processes (`[measure] rounds`, `ab --rounds 3`) or "
                  "more cells in the matrix sharpen it.", ""]
    if any(v is not None for v in c.load.values()):
        lines += ["Machine load while measuring (median share of all CPUs used by other processes): " +
                  ", ".join(f"{k} {_pct(v)}" for k, v in c.load.items()) + ".", ""]
    for line in (separate_hosts(c), machine_changes(c)):
        if line:
            lines += [line, ""]
    rows = c.rows if show_all else [r for r in c.rows if r.verdict != "unchanged"]
    if rows:
        lines += ["| cell | metric | base → head | change | interval | q | verdict | MDE (threshold) | samples |",
                  "|---|---|---|---|---|---|---|---|---|", *map(_row, rows)]
    else:
        lines.append("Every comparison is unchanged.")
    if c.unmatched:
        one = all(u.endswith(("(only in base)", "(only in head)")) for u in c.unmatched)
        lines += ["", f"Cells {'in only one run' if one else 'not recorded in both runs'} (skipped): "
                  f"{len(c.unmatched)}", "",
                  *[f"- {_esc(u)}" for u in c.unmatched]]
    noise = noise_table(c)
    if noise:
        lines += ["", "Observed noise per metric (median robust CV over cells, both sides; sd of a whole process's "
                      "level beyond its repetitions, pooled over cells, with its degrees of freedom: the fewer, the "
                      "larger a change must be to be called) and median MDE:", "",
                  "| metric | noise (CV) | between processes | MDE | comparisons |", "|---|---|---|---|---|", *noise]
    return "\n".join(lines) + "\n"


def separate_hosts(c: Comparison) -> str | None:
    """A line when base and head were measured on machines that share no host (None otherwise)."""
    base, head = c.hosts.get("base") or [], c.hosts.get("head") or []
    if not base or not head or set(base) & set(head):
        return None
    return (f"Base and head were measured on different hosts (base: {_esc(', '.join(base))}; head: "
            f"{_esc(', '.join(head))}): a difference between the machines moves every cell alike, and no test "
            "here can tell it from a change of the code; `infermatrix ab` measures both revisions in one job.")


def machine_changes(c: Comparison) -> str | None:
    """A line when a roofline ceiling the two runs measured differs by more than the speed threshold."""
    band = math.log(1 + c.config["speed_threshold"])
    moved = [x for x in c.ceilings if abs(math.log(x["ratio"])) > band]
    if not moved:
        return None
    figures = "; ".join(f"{_esc(x['device'])} {_esc(x['figure'])} {x['base']:.4g} → {x['head']:.4g} {x['unit']} "
                        f"({_change(x['ratio'])})" for x in moved)
    return (f"The machine's own ceilings, measured at each run's start, differ beyond "
            f"±{c.config['speed_threshold']:.0%}: {figures}. A change of that size in every cell is the machine's, "
            "not the code's.")


def noise_table(c: Comparison) -> list[str]:
    import numpy as np

    out = []
    for label in dict.fromkeys(r.label for r in c.rows if r.kind != "status"):
        rows = [r for r in c.rows if r.label == label]
        cvs = [r.cv for r in rows if r.cv is not None]
        sds = [f"{_pct(r.process_sd)} ({r.process_df} df)" for r in rows if r.process_sd is not None]  # one per device
        mdes = [r.mde for r in rows if r.mde is not None and not math.isnan(r.mde)]
        out.append(f"| {label} | {_pct(float(np.median(cvs)) if cvs else None)} | "
                   f"{' / '.join(dict.fromkeys(sds)) or '-'} | "
                   f"{_pct(float(np.median(mdes)) if mdes else None)} | {len(rows)} |")
    return out
