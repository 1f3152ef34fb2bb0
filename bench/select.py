"""Choosing a deployment variant under constraints, with the reason every other one lost.

Per group (one model, device and scenario; see ``bench.report.table``):

1. cells that failed or were skipped lose with their error; cells missing a metric that a
   constraint or the objective needs lose with "not measured";
2. constraints are bounds on point values (the p50 of latencies, drift means): a cell over
   a bound loses with the figure and the bound;
3. among the rest, the candidates are the cells no other clearly beats on the objective (its
   interval, the 95% CI of the median, entirely on the better side of theirs, or overlapping
   with repetitions whose ranks are apart: Mann-Whitney p < 0.01 on at least 5 a side):
   differences inside the noise are not wins. The best point value is always a candidate, and every two
   candidates are *tied*: their intervals overlap, or one figure rests on too few repetitions
   for its interval to mean anything (*not told apart*). Ties are broken by the Pareto front,
   lower KLD, then lower peak memory; the choice is then not called best, and says so;
4. the Pareto front is taken over the objective and KLD (speed against drift): a cell is
   dominated when another is at least as good on both (within noise) and clearly better
   (intervals apart) on one. A figure on too few repetitions is never judged at least as
   good or as bad as another: a cell it belongs to is neither dominated nor dominating on it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.catalogue import (
    MIB,
    MIN_CI_COVERAGE,
    Metric,
    comparable,
    interval,
    metric,
    point,
    repetition_summary,
    sample_count,
    too_few_repetitions,
)
from bench.progress import error_cause
from bench.report.table import Group, drift_on_random_weights, group_records
from optimize.errors import InputError, clip

DRIFT_AXIS = "kld_mean"
DEFAULT_OBJECTIVE = "decode_tokens_per_s"
# A prefill sweep's cells do not decode: their groups are judged on the prompt pass.
PREFILL_OBJECTIVE = "prefill_tokens_per_s"


# Statistics of a summary metric (every repetition's values) a constraint may bound; p50 is the point value.
STATS = ("p50", "p90", "p99", "mean", "min", "max")


@dataclass(frozen=True)
class Constraint:
    """A bound on one catalogue metric: ``value <= bound`` (max) or ``>= bound`` (min).

    ``stat`` picks a statistic of a summary metric's repetitions (``p99`` of ``ttft_ms``, as
    MLPerf bounds latency); None is the point value (the p50 of a summary).
    """

    key: str
    bound: float
    side: Literal["max", "min"]
    flag: str = ""
    given: float | None = None  # the flag's value in its own unit (MiB for --max-memory-mib)
    stat: str | None = None

    def value(self, record: dict[str, Any]) -> float | None:
        if self.stat in (None, "p50"):
            return point(record, self.key)
        summary = repetition_summary(record, self.key)  # a rate's: its repetitions' summary
        value = summary.get(self.stat) if isinstance(summary, dict) else None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    def violation(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` breaks this constraint, or None when it satisfies it."""
        m = metric(self.key)
        label = f"{m.label} {self.stat}" if self.stat else m.label
        value = self.value(record)
        if value is None:
            return f"no {label} measured ({self.flag or self.key} needs it)"
        over = value > self.bound if self.side == "max" else value < self.bound
        if not over:
            return None
        op = ">" if self.side == "max" else "<"
        n = (repetition_summary(record, self.key) or {}).get("n") if self.stat else None
        of = f" over {n} samples" if n else ""  # repetitions; for ITL, every token gap of every repetition
        return f"{label} {m.format(value)}{of} {op} {m.format(self.bound)} ({self.flag or self.key})"

    def to_dict(self) -> dict[str, Any]:
        summary = metric(self.key).shape == "summary"
        return {"metric": self.key, "side": self.side, "bound": self.bound, "flag": self.flag, "given": self.given,
                "stat": (self.stat or "p50") if summary else self.stat}


WHERE = re.compile(r"^\s*([A-Za-z0-9_]+)(?:\.([A-Za-z0-9]+))?\s*(<=|>=)\s*(\S+)\s*$")


BOUNDABLE = ("summary", "scalar")  # the metric shapes a --where bound applies to


def parse_where(text: str) -> Constraint:
    """``--where METRIC[.STAT]<=VALUE`` (or ``>=``): a bound on any catalogue metric, in its stored unit."""
    match = WHERE.match(text)
    if not match:
        raise InputError(f"--where {text!r}: expected METRIC<=VALUE or METRIC.STAT>=VALUE, e.g. 'ttft_ms.p99<=200'")
    key, stat, op, number = match.groups()
    try:
        m = metric(key, BOUNDABLE)
    except InputError as exc:
        raise InputError(f"--where {text!r}: {exc}") from None
    if m.shape not in BOUNDABLE:
        raise InputError(f"--where {text!r}: {key} is not a number a bound can apply to")
    if stat is not None:
        if m.shape != "summary" and not m.ci_key:  # a rate (with a ci_key) has a value per repetition
            raise InputError(f"--where {text!r}: {key} is one figure per cell; statistics ({', '.join(STATS)}) "
                             "apply to metrics with a value per repetition")
        if stat not in STATS:
            raise InputError(f"--where {text!r}: unknown statistic {stat!r}; one of {', '.join(STATS)}")
    try:
        bound = float(number)
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise InputError(f"--where {text!r}: the bound must be a finite number, got {number!r}")
    c = Constraint(key, bound, "max" if op == "<=" else "min", f"--where {text.strip()}", bound, stat)
    return satisfiable(c, f"--where {text!r}")


def satisfiable(c: Constraint, what: str) -> Constraint:
    """``c``, or an ``InputError`` naming ``what`` when no figure the record contract allows can meet it
    (``ttft_ms<=0``): a bound every cell would violate is a mistake, not a question.
    """
    from bench.results import metric_domain

    low, low_excluded, high = metric_domain(c.key, c.stat)
    name = f"{c.key}.{c.stat}" if c.stat else c.key
    if c.side == "max" and low is not None and (c.bound < low or (low_excluded and c.bound == low)):
        raise InputError(f"{what} can hold for no cell: {name} is {'above' if low_excluded else 'at least'} "
                         f"{low:g}")
    if c.side == "min" and high is not None and c.bound > high:
        raise InputError(f"{what} can hold for no cell: {name} is at most {high:g}")
    return c


# flag: (metric, side, multiplier from the flag's unit to the stored unit)
CONSTRAINT_FLAGS = {
    "max_kld": ("kld_mean", "max", 1.0),
    "max_ppl_ratio": ("ppl_ratio", "max", 1.0),
    "min_top1": ("top1_agreement", "min", 1.0),
    "max_memory_mib": ("peak_memory_bytes", "max", float(MIB)),
    "max_serving_memory_mib": ("serving_peak_memory_bytes", "max", float(MIB)),
    "max_ttft_ms": ("ttft_ms", "max", 1.0),
    "max_tpot_ms": ("tpot_ms", "max", 1.0),
}


def constraints_from(values: dict[str, float | None]) -> list[Constraint]:
    """Constraints from flag values (``{"max_kld": 0.05, ...}``); None means unset. Bad values raise InputError."""
    out = []
    for name, value in values.items():
        if value is None:
            continue
        if name not in CONSTRAINT_FLAGS:
            raise InputError(f"unknown constraint {name!r}; known: {', '.join(CONSTRAINT_FLAGS)}")
        key, side, scale = CONSTRAINT_FLAGS[name]
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{flag} must be a finite number >= 0, got {value!r}")
        if name == "min_top1" and value > 1:
            raise InputError(f"{flag} is a fraction in [0, 1], got {value!r}")
        out.append(satisfiable(Constraint(key, float(value) * scale, side, flag, float(value)), f"{flag} {value:g}"))
    return out


@dataclass
class Verdict:
    variant: str
    outcome: Literal["chosen", "tie", "lost", "violates", "missing", "failed", "skipped"]
    reason: str = ""
    objective: float | None = None
    objective_ci: tuple[float, float] | None = None
    dominated_by: str | None = None  # the variant at least as good on every axis and better on one

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "outcome": self.outcome, "reason": self.reason,
                "objective": self.objective, "objective_ci": list(self.objective_ci) if self.objective_ci else None,
                "dominated_by": self.dominated_by}


@dataclass
class Decision:
    """The answer for one group: chosen variant (None when nothing satisfies), ties, verdicts, Pareto front."""

    group: Group
    objective: Metric
    constraints: list[Constraint]
    chosen: str | None = None
    ties: list[str] = field(default_factory=list)
    front: list[str] = field(default_factory=list)
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        g = self.group
        return {"model": g.model, "device": g.device, "scenario": g.scenario, "objective": self.objective.key,
                "direction": self.objective.direction, "constraints": [c.to_dict() for c in self.constraints],
                "chosen": self.chosen, "ties": self.ties, "pareto_front": self.front,
                "pareto_axes": [self.objective.key, DRIFT_AXIS],
                "variants": [v.to_dict() for v in self.verdicts.values()]}


# [min, max] of n repetitions holds the median with probability 1 - 2 / 2**n: the fewest whose interval
# covers at least MIN_CI_COVERAGE (5 for 90%: 93.75%).
REPETITIONS_NEEDED = next(n for n in range(1, 64) if 1 - 2 / 2**n >= MIN_CI_COVERAGE)


def overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """True when two intervals overlap (no interval: only equal points count as a tie, handled by callers)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


# Two figures whose intervals overlap are still apart when their repetitions' ranks are (Mann-Whitney U,
# two-sided, as asv judges a change): overlapping 95% intervals alone are far stricter than a 5% test.
RANK_ALPHA = 0.01


def rank_p(a: dict[str, Any], b: dict[str, Any], m: Metric) -> float | None:
    """Two-sided Mann-Whitney p of the two records' repetitions of ``m`` (a roofline figure: its rate's),
    or None where either has fewer than REPETITIONS_NEEDED of them (its ranks say too little).
    """
    key = m.scales_with or m.key
    xa, xb = ((r.get("samples") or {}).get(key) for r in (a, b))
    if not all(isinstance(x, list) and len(x) >= REPETITIONS_NEEDED and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x) for x in (xa, xb)):
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(xa, xb, alternative="two-sided").pvalue)


def _ranks_apart(a: dict[str, Any], b: dict[str, Any], m: Metric) -> bool:
    p = rank_p(a, b, m)
    return p is not None and p < RANK_ALPHA


def _span(record: dict[str, Any], m: Metric) -> tuple[float, float] | None:
    """The figure's interval; a figure without one (a single repetition) spans its own point."""
    ci, value = interval(record, m.key), point(record, m.key)
    return ci if ci is not None or value is None else (value, value)


def _compare(record_a, record_b, m: Metric) -> int:
    """+1 when a is clearly better than b, -1 clearly worse, 0 when tied.

    Clearly: intervals apart, or overlapping with repetitions whose ranks are apart (``RANK_ALPHA``).
    Tied: within noise, equal, or not to be told apart (either figure rests on too few repetitions
    for its interval to mean anything).
    """
    va, vb = point(record_a, m.key), point(record_b, m.key)
    if va == vb:
        return 0
    if overlap(_span(record_a, m), _span(record_b, m)) and not _ranks_apart(record_a, record_b, m):
        return 0
    if too_few_repetitions(record_a, m.key) or too_few_repetitions(record_b, m.key):
        return 0
    return 1 if m.better(va, vb) else -1


def _apart_note(a: dict[str, Any], b: dict[str, Any], m: Metric) -> str:
    """' (intervals overlap, ranks apart: Mann-Whitney p 0.0011)' where that is why a and b differ, else ''."""
    if not overlap(_span(a, m), _span(b, m)) or _compare(a, b, m) == 0:
        return ""
    return f" (intervals overlap, ranks apart: Mann-Whitney p {rank_p(a, b, m):.2g})"


def _at_least_as_good(a: dict[str, Any], b: dict[str, Any], m: Metric) -> bool:
    """True when a is clearly better than b, or tied with it where both figures rest on enough repetitions.

    A tie of figures on too few repetitions says nothing either way (a 1-repetition interval has no
    width), so it cannot make a the equal of b, let alone better.
    """
    c = _compare(a, b, m)
    return c > 0 or (c == 0 and not too_few_repetitions(a, m.key) and not too_few_repetitions(b, m.key))


def _versus(dominator: dict[str, Any], b: dict[str, Any], m: Metric) -> str:
    """How a dominating record compares with b on one metric, in a verdict's words (never worse: it dominates)."""
    if _compare(dominator, b, m) > 0:
        return "better" + _apart_note(dominator, b, m)
    return "equal" if point(dominator, m.key) == point(b, m.key) else "tied within noise"


def _too_few(a: dict[str, Any], b: dict[str, Any], m: Metric) -> str | None:
    """Why two figures whose intervals do not overlap still tie (too few repetitions), or None."""
    if overlap(_span(a, m), _span(b, m)) or not (too_few_repetitions(a, m.key)
                                                                or too_few_repetitions(b, m.key)):
        return None
    counts = [x for x in (sample_count(a, m.key), sample_count(b, m.key)) if x is not None]
    if not counts:
        return f"too few repetitions for an interval, which needs {REPETITIONS_NEEDED}"
    n = min(counts)
    return f"{n} repetition{'s are' if n != 1 else ' is'} too few for an interval, which needs {REPETITIONS_NEEDED}"


def _level_with(winner: dict[str, Any], others: list[dict[str, Any]], m: Metric) -> str:
    """'could not be told apart from fp32, bf16 (3 repetitions are too few ...) and tied within noise with
    q8': how the winner's figure stands against each of ``others``, grouped by why it could not win on it.
    """
    why: dict[str | None, list[str]] = {}
    for o in others:
        why.setdefault(_too_few(winner, o, m), []).append(o["variant"])
    parts = [f"could not be told apart from {', '.join(names)} ({few})" for few, names in why.items() if few]
    if None in why:
        parts.append(f"is tied within noise with {', '.join(why[None])}")
    return " and ".join(parts)


def dominates(a: dict[str, Any], b: dict[str, Any], axes: list[Metric]) -> bool:
    """Record a is at least as good as b on every axis (within noise) and clearly better on one."""
    return all(_at_least_as_good(a, b, m) for m in axes) and any(_compare(a, b, m) > 0 for m in axes)


def pareto_front(records: list[dict[str, Any]], axes: list[Metric]) -> list[dict[str, Any]]:
    """Records no other record dominates (all must hold every axis)."""
    return [r for r in records if not any(dominates(o, r, axes) for o in records if o is not r)]


def _describe(record, m: Metric) -> str:
    ci = interval(record, m.key)
    text = m.format(point(record, m.key))
    return text + (f" [{m.format(ci[0])}, {m.format(ci[1])}]" if ci and m.kind != "drift" else "")


def decide(group: Group, objective: Metric, constraints: list[Constraint]) -> Decision:
    """The decision for one group of records (see the module docstring for the rules)."""
    d = Decision(group, objective, constraints)
    feasible = []
    for r in group.records():
        name = r["variant"]
        if r["status"] != "ok":
            cause = clip(error_cause(r.get("error")), 200) or "(no error)"  # a traceback's exception line
            d.verdicts[name] = Verdict(name, r["status"], f"{r['status']}: {cause}")
            continue
        broken = [v for v in (c.violation(r) for c in constraints) if v]
        missing = [v for v in broken if v.startswith("no ")]
        if point(r, objective.key) is None:
            missing.insert(0, f"no {objective.label} measured (the objective)")
        if missing:
            drift_err = error_cause(r.get("drift_error"))
            extra = f"; drift failed: {clip(drift_err, 160)}" if drift_err else ""
            d.verdicts[name] = Verdict(name, "missing", "; ".join(missing) + extra)
        elif broken:
            d.verdicts[name] = Verdict(name, "violates", "; ".join(broken))
        else:
            feasible.append(r)
    if not feasible:
        return d
    drift = metric(DRIFT_AXIS)
    axes = [objective] + ([drift] if objective.key != DRIFT_AXIS else [])
    on_axes = [r for r in feasible if all(point(r, m.key) is not None for m in axes)]
    front = pareto_front(on_axes, axes) if on_axes else []
    d.front = [r["variant"] for r in front]
    # The candidates: every cell no other clearly beats on the objective (the best point's among them).
    # Judging ties against the best point alone would let a cell it overlaps win on drift though
    # another candidate is clearly faster than it.
    level = [r for r in feasible if not any(_compare(o, r, objective) > 0 for o in feasible if o is not r)]
    winner = min(level, key=lambda r: _tie_key(r, d.front, objective))
    d.chosen = winner["variant"]
    dominated = {id(r) for r in on_axes if any(dominates(o, r, axes) for o in on_axes if o is not r)}
    # A variant tied on the objective but clearly worse on drift is dominated, not tied.
    tied = [r for r in level if r is winner or id(r) not in dominated]
    d.ties = [r["variant"] for r in tied if r is not winner]
    for r in feasible:
        name = r["variant"]
        v = Verdict(name, "lost", objective=point(r, objective.key), objective_ci=interval(r, objective.key))
        if r is winner:
            v.outcome = "chosen"
            v.reason = _chosen_reason(winner, [o for o in level if o is not winner], d.front, objective)
        elif r in tied:
            v.outcome = "tie"
            few = _too_few(r, winner, objective)
            v.reason = ((f"tied with {d.chosen} within noise" if not few else f"not told apart from {d.chosen}")
                        + f" on {objective.label} ({_describe(r, objective)} vs {_describe(winner, objective)}"
                        + (f"; {few}" if few else "")
                        + f"); {d.chosen} won the tie-break: {_tie_reason(winner, r, d.front, objective)}")
        else:
            dom = next((o for o in on_axes if dominates(o, r, axes)), None) if r in on_axes else None
            if dom is not None:
                # Each axis says how it compares: a faster variant can be dominated where its
                # speed is inside the noise of the other's and its drift clearly worse.
                v.dominated_by = dom["variant"]
                v.reason = "dominated by " + dom["variant"] + " (" + "; ".join(
                    f"{m.label} {_describe(dom, m)} vs {_describe(r, m)}: {_versus(dom, r, m)}" for m in axes) + ")"
            else:
                v.reason = (f"{objective.label} {_describe(r, objective)} vs {d.chosen}'s "
                            f"{_describe(winner, objective)}" + _apart_note(winner, r, objective)
                            + (" (on the Pareto front: less drift)" if name in d.front else ""))
        d.verdicts[name] = v
    order = {r["variant"]: i for i, r in enumerate(group.records())}
    d.verdicts = dict(sorted(d.verdicts.items(), key=lambda kv: (_RANK[kv[1].outcome], order[kv[0]])))
    return d


_RANK = {"chosen": 0, "tie": 1, "lost": 2, "violates": 3, "missing": 4, "skipped": 5, "failed": 6}


def _chosen_reason(winner: dict[str, Any], level: list[dict[str, Any]], front: list[str], objective: Metric) -> str:
    """Why the winner was chosen: its objective where it is clearly ahead of every other candidate; else
    which candidates its figure could not be told apart from, and why, and that the tie-break chose.

    ``level`` holds the candidates its objective could not tell from the best one (those dominated on
    drift too): the tie-break, not the objective, is what put the winner before them.
    """
    if not level:
        return f"best {objective.label}: {_describe(winner, objective)}"
    why: dict[str, list[str]] = {}
    for o in level:
        why.setdefault(_tie_reason(winner, o, front, objective), []).append(o["variant"])
    breaks = "; ".join(_break_text(reason, ", ".join(names)) for reason, names in why.items())
    return (f"{objective.label} {_describe(winner, objective)} {_level_with(winner, level, objective)}; "
            f"the choice rests on the tie-break: {breaks}")


def _tie_key(r, front: list[str], objective: Metric) -> tuple:
    kld, mem = point(r, DRIFT_AXIS), point(r, "peak_memory_bytes")
    obj = point(r, objective.key) * (-1 if objective.direction == "higher" else 1)
    return (r["variant"] not in front, math.inf if kld is None else kld, math.inf if mem is None else mem, obj)


FRONT_REASON = "on the Pareto front"
EQUAL_REASON = "equal on every tie-break key, listed first"


def _break_text(reason: str, names: str) -> str:
    if reason == FRONT_REASON:
        return f"{reason}, unlike {names}"
    if reason == EQUAL_REASON:
        return f"{reason} (before {names})"
    return f"{reason} than {names}"


def _tie_reason(winner, loser, front: list[str], objective: Metric) -> str:
    """Why ``winner`` ranks before ``loser`` in ``_tie_key`` order (both tied on the objective).

    The first key where they differ decides, in the winner's favour. A loser off the Pareto front
    either has no KLD or is dominated: where the winner's KLD is lower (or present against absent)
    that is the reason, else being on the front is. Then lower memory, then the point value; equal on
    all of them, the winner is merely listed first.
    """
    labels = (FRONT_REASON, "lower KLD", "lower peak memory", "better objective point value")
    keys = zip(labels, _tie_key(winner, front, objective), _tie_key(loser, front, objective), strict=True)
    label = next((label for label, w, lo in keys if w != lo), EQUAL_REASON)
    if label == FRONT_REASON and _tie_key(winner, front, objective)[1] < _tie_key(loser, front, objective)[1]:
        return "lower KLD"
    return label


def filter_records(records: list[dict[str, Any]], device: str | None = None,
                   scenario: str | None = None) -> list[dict[str, Any]]:
    """Records of ``device`` and ``scenario`` ("generate", or "generate:B/P/N"); InputError when none match."""
    out = records
    if device:
        out = [r for r in out if r["device"] == device]
        if not out:
            have = sorted({r["device"] for r in records})
            raise InputError(f"--device {device!r} matches no cell; the run has: {', '.join(have) or 'none'}")
    if scenario:
        name, _, shape = scenario.partition(":")

        def matches(r) -> bool:
            s = r["scenario"]
            return s["name"] == name and (not shape or shape == f"{s['batch_size']}/{s['prompt_tokens']}/"
                                          f"{s['new_tokens']}")
        before, out = out, [r for r in out if matches(r)]
        if not out:
            have = sorted({f"{r['scenario']['name']}:{r['scenario']['batch_size']}/{r['scenario']['prompt_tokens']}/"
                           f"{r['scenario']['new_tokens']}" for r in before})
            raise InputError(f"--scenario {scenario!r} matches no cell; the run has: {', '.join(have) or 'none'}")
    return out


def default_objective(group: Group) -> Metric:
    """Decode tokens/s; prefill tokens/s for a prefill sweep's group (its cells generate one token)."""
    return metric(PREFILL_OBJECTIVE if group.scenario.get("name") == "prefill" else DEFAULT_OBJECTIVE)


def select(records: list[dict[str, Any]], objective: str | None = None, constraints: list[Constraint] = (),
           device: str | None = None, scenario: str | None = None) -> list[Decision]:
    """One decision per (model, device, scenario) group of ``records``; each group's default objective unless given."""
    obj = comparable(objective) if objective is not None else None
    if not records:
        raise InputError("the run has no cell records")
    return [decide(g, obj or default_objective(g), list(constraints))
            for g in group_records(filter_records(records, device, scenario))]


def front_text(d: Decision) -> str:
    """The Pareto front's variants, or why there is none (no eligible variant, or drift not measured)."""
    if d.front:
        return ", ".join(d.front)
    if d.chosen is None:
        return "none: no variant is eligible (each failed, was skipped, lacks a figure or breaks a constraint)"
    return f"none: no variant has both {d.objective.label} and KLD"


def _none_chosen(d: Decision) -> str:
    """Why nothing was chosen: the constraints ruled every measured variant out, or none has the figures."""
    if any(v.outcome == "violates" for v in d.verdicts.values()):
        return "no variant satisfies the constraints"
    return f"no variant has the figures to judge (ok, with {d.objective.label}" + \
        (" and every constrained figure)" if d.constraints else ")")


def format_decisions(decisions: list[Decision]) -> str:
    """Plain text: chosen variant, why each other lost, the Pareto front."""
    lines = []
    for d in decisions:
        g = d.group
        lines.append(f"{g.title}")
        bounds = ", ".join(c.flag if c.flag.startswith("--where") else
                           f"{c.flag} {c.bound if c.given is None else c.given:g}" for c in d.constraints)
        lines.append(f"  objective: {d.objective.label} ({d.objective.direction} is better)"
                     + (f"; constraints: {bounds}" if bounds else ""))
        if d.chosen:
            lines.append(f"  chosen: {d.chosen}: {d.verdicts[d.chosen].reason}")
        else:
            lines.append(f"  chosen: none: {_none_chosen(d)}")
        for v in d.verdicts.values():
            if v.outcome != "chosen":
                lines.append(f"  - {v.variant} [{v.outcome}]: {v.reason}")
        lines.append(f"  Pareto front ({d.objective.label} vs KLD): {front_text(d)}")
        if any(drift_on_random_weights(r) for r in g.records()):
            lines.append(f"  note: {g.model} has random weights: its drift checks the mechanics, not accuracy")
        lines.append("")
    return "\n".join(lines)
