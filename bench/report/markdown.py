"""A GitHub-flavoured Markdown report of one run: environment, ceilings, per-scenario tables,
the recommended variant, the Pareto front and notes. Renders in a PR comment or a job summary.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from bench.catalogue import METRICS, MIN_CI_COVERAGE
from bench.cells import identity
from bench.progress import error_cause
from bench.report.table import (
    NOISY_REL_CI,
    Group,
    Row,
    cpu_text,
    drift_on_random_weights,
    drift_protocol_name,
    gpus_text,
    group_records,
    speedup_basis,
    speedup_text,
)
from bench.rounds import configured_rounds, short_of_rounds
from bench.select import decide, default_objective, front_text
from optimize.errors import clip
from optimize.libraries import libraries

LIBRARIES = libraries("report")

# (header, catalogue key or a special column); latencies carry their CI and n.
MD_COLUMNS = [("TTFT p50 ms [95% CI]", "ttft_ms"), ("TPOT p50 ms [95% CI]", "tpot_ms"), ("n", "n"),
              ("speedup", "speedup"), ("decode tok/s [95% CI]", "decode_tokens_per_s"),
              ("prefill tok/s [95% CI]", "prefill_tokens_per_s"), ("roofline", "roofline_fraction"),
              ("prefill FLOP frac", "prefill_flops_fraction"),
              ("peak MiB", "peak_memory_bytes"), ("serving peak MiB", "serving_peak_memory_bytes"),
              ("weights MiB", "weights_bytes"), ("ppl ratio", "ppl_ratio"),
              ("KLD mean", "kld_mean"), ("top-1", "top1_agreement"), ("gen match", "gen_exact_match"),
              ("gen prefix", "gen_common_prefix_mean"), ("status", "status")]


# Markdown that data (names, errors, paths) must not produce: a table cell's end, HTML, a code span,
# emphasis, or a link or image (a name ``![x](https://...)`` would load an image in a PR comment). An
# inline link needs ``](`` with nothing between; our own bracketed intervals ``[1.2, 3.4]`` stay as they are.
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\|`*"} | {"<": "&lt;", ">": "&gt;"})


def md_escape(text: Any) -> str:
    """Data shown as itself in GitHub-flavoured Markdown, in a table cell or a list: no pipes, no HTML,
    no links, images, code spans or emphasis, one line.
    """
    return " ".join(str(text).translate(_MD_SPECIAL).replace("](", "\\](").split())


def md_code(text: Any) -> str:
    """``text`` as an inline code span that nothing in it can end (CommonMark: a fence longer than any run
    of backticks inside), one line; not for table cells, where a pipe still ends the cell.
    """
    body = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


NOT_ENDED = "not ended (interrupted, or still running)"


def run_facts(run: dict[str, Any], records: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """What a report's header says about the run, raw text.

    '?' stands for what run.json does not hold (only ``matrix`` is required); an unfinished run
    says so rather than "ended None", and names the cells of its matrix that have no record.
    """
    env = run.get("environment") or {}
    libs = env.get("libraries") or {}
    git = env.get("git") or {}
    facts = {"started": str(run.get("started") or "?"), "ended": str(run.get("ended") or NOT_ENDED),
             "launcher": str(run.get("launcher") or "?") + (f", shard {run['shard']}" if run.get("shard") else ""),
             "CPU": cpu_text(env), "GPUs": gpus_text(env),
             "libraries": ", ".join(f"{k} {libs[k]}" for k in LIBRARIES if k in libs),
             "git": str(git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")}
    facts.update({f"{d} ceilings (measured)": t for d, t in ceiling_texts(run).items()})
    differences = run.get("roofline_differences")  # a merge of runs whose ceilings differ
    if isinstance(differences, list) and differences:
        facts["ceilings differ"] = ("; ".join(map(str, differences)) + ": each record's roofline fractions are of "
                                    "its own run's ceilings (its metrics.roofline_ceilings), not all of those above")
    hosts = hosts_text(records or [])
    if hosts:
        facts["hosts"] = hosts
    mixed = run.get("environment_differences")  # shards merged, or a resume, from differing environments
    if isinstance(mixed, list) and mixed:
        facts["environments differ"] = ("; ".join(map(str, mixed)) + ": its cells were not all measured in one "
                                        "environment (compare withholds its verdicts on this run)")
    if run.get("missing_shards"):
        facts["missing shards"] = (", ".join(map(str, run["missing_shards"]))
                                   + ": merged without them, their cells have no record")
    rounds = configured_rounds(run)
    if rounds > 1:
        facts["rounds"] = (f"{rounds} per cell, each in a fresh process; the figures pool every ok round's "
                           "repetitions (n counts them all; memory, roofline and drift: the median over rounds)")
    if records is not None:
        text = unrecorded_text(run, records)
        if text:
            facts["not recorded"] = text
        text = short_of_rounds_text(records)
        if text:
            facts["short of rounds"] = text
    return facts


def hosts_text(records: list[dict[str, Any]]) -> str | None:
    """'measured on 2 hosts: a (6 cells), b (4 cells)' when the records name more than one host; else None."""
    counts = Counter(r["host"] for r in records if isinstance(r.get("host"), str))
    if len(counts) < 2:
        return None
    return f"measured on {len(counts)} hosts: " + ", ".join(
        f"{h} ({n} cell{'' if n == 1 else 's'})" for h, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def short_of_rounds_text(records: list[dict[str, Any]]) -> str | None:
    """'2 of 6 cells have fewer ok rounds than the 3 asked for: <cell> (1 ok); ...', or None."""
    short = [r for r in records if r["status"] == "ok" and short_of_rounds(r)]
    if not short:
        return None
    wanted = short[0]["rounds"]["configured"]
    shown = "; ".join(f"{identity(r['model'], r['variant'], r['device'], r['scenario'])} ({r['rounds']['ok']} ok)"
                      for r in short[:UNRECORDED_SHOWN])
    more = f"; and {len(short) - UNRECORDED_SHOWN} more" if len(short) > UNRECORDED_SHOWN else ""
    return (f"{len(short)} of {len(records)} cells have fewer ok rounds than the {wanted} asked for: {shown}{more} "
            "(their figures pool the rounds they have; 'infermatrix run --resume' runs the rest)")


UNRECORDED_SHOWN = 10


def unrecorded_text(run: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """'3 of 10 cells have no record: <cell>; ...' for a run whose matrix holds cells that never ended;
    None when every cell has its record or run.json cannot say which cells the matrix holds.
    """
    from bench.orchestrate import unrecorded_cells, unrecorded_count

    missing = unrecorded_cells(run, records)
    if not missing:
        return None
    shown = "; ".join(c.key for c in missing[:UNRECORDED_SHOWN])
    more = f"; and {len(missing) - UNRECORDED_SHOWN} more" if len(missing) > UNRECORDED_SHOWN else ""
    how = ("" if run.get("missing_shards") else
           " ('infermatrix run --resume' on the run directory runs them)")
    return f"{unrecorded_count(missing, records)}: {shown}{more}{how}"


# run facts listed as they are, after the environment's own lines
LISTED_FACTS = ("ceilings differ", "environments differ", "hosts", "rounds", "missing shards", "not recorded",
                "short of rounds")


def environment_lines(run: dict[str, Any], records: list[dict[str, Any]] | None = None) -> list[str]:
    f = {k: md_escape(v) for k, v in run_facts(run, records).items()}
    lines = [f"- started {f['started']}, " + (f"ended {f['ended']}" if run.get("ended") else f["ended"])
             + f"; launcher {f['launcher']}",
             f"- CPU {f['CPU']}, GPUs: {f['GPUs']}"]
    if f["libraries"]:
        lines.append(f"- {f['libraries']}")
    lines.append(f"- git {f['git']}")
    lines += [f"- {k}: {v}" for k, v in f.items()
              if k.endswith(" ceilings (measured)") or k in LISTED_FACTS]
    return lines


def ceiling_texts(run: dict[str, Any]) -> dict[str, str]:
    out = {}
    for device, c in (run.get("roofline") or {}).items():
        rates = ", ".join(f"{d} {m['tflops'] * 1e3:.0f} {'GOP/s' if d == 'int8' else 'GFLOP/s'}"
                          + (f" ({m['backend']})" if m.get("backend", "torch") != "torch" else "")
                          for d, m in c.get("matmul", {}).items())
        out[device] = f"copy {c['memory']['bandwidth_gbps']:.1f} GB/s" + (f"; matmul {rates}" if rates else "")
    return out


def cell_text(row: Row, key: str) -> str:
    if key == "speedup":
        return speedup_text(row)
    if key == "status":
        drift = row.drift_text()
        return row.status + ("" if drift in ("-", "ok") else f", {drift}")
    if key == "n":
        n = row.figures["ttft_ms"].n
        return str(n) if n else "-"
    fig = row.figures[key]
    return fig.text(with_ci=METRICS[key].shape == "summary" or METRICS[key].ci_key is not None)


def group_columns(group: Group) -> list[tuple[str, str]]:
    """The table's columns for one group: those with a figure in some row (a prefill sweep has no TPOT)."""
    return [(h, k) for h, k in MD_COLUMNS if any(cell_text(row, k) != "-" for row in group.rows)]


def group_table(group: Group) -> list[str]:
    columns = group_columns(group)
    lines = ["| variant | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "".join("---:|" if k not in ("status",) else "---|" for _, k in columns)]
    for row in group.rows:
        cells = [md_escape(row.variant)] + [md_escape(cell_text(row, k)) for _, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recommendation_lines(group: Group) -> list[str]:
    d = decide(group, default_objective(group), [])
    if not d.chosen:
        return ["- nothing to recommend: no variant has every figure the choice needs"]
    lines = [f"- **recommended: {md_escape(d.chosen)}**: {md_escape(d.verdicts[d.chosen].reason)} "
             "(`infermatrix select` with no constraints; add `--max-kld` etc. for yours)"]
    lines.append(f"- Pareto front ({d.objective.label} against KLD): {md_escape(front_text(d))}")
    dominated = [v for v in d.verdicts.values() if v.dominated_by]
    if dominated:
        lines.append(f"- dominated (another variant clearly better on {md_escape(d.objective.label)} or KLD and at "
                     "least as good, within noise, on the other): "
                     + "; ".join(f"{md_escape(v.variant)} (dominated by {md_escape(v.dominated_by)})"
                                 for v in dominated))
    return lines


def reading_notes(noisy_mark: str) -> list[str]:
    """What the table's figures mean, one item each (Markdown and HTML render them)."""
    return [
        "Latencies are the median (p50) over n repetitions, with the distribution-free 95% confidence "
        "interval of the median in brackets; rates are medians too. Fewer than 6 repetitions cannot reach 95%: "
        "the interval is then their [min, max], which holds the median 93.75% of the time at 5, 87.5% at 4.",
        f"{noisy_mark} marks a noisy figure: its 95% interval is wider than {NOISY_REL_CI:.0%} of its value "
        "(something else ran, or too few repetitions), or it rests on fewer than 5 repetitions (an interval "
        f"covering under {MIN_CI_COVERAGE:.0%}; of one repetition it has no width); a speedup, when its "
        "interval is that wide against its ratio or either side rests on so few. Differences inside "
        "overlapping intervals, or between such figures, are ties.",
        "roofline: the decode step's bytes (weights, and the KV cache of every sequence) x steps/s over the "
        "copy bandwidth measured at the start of the run; prefill FLOP frac: the prompt pass's FLOP/s (counted "
        "as the variant runs it) over the measured matmul rate of the dtype its recipe computes in (int8 for "
        "integer products). The ceilings are a large copy and the fastest large matmul measured at the start of "
        "the run (torch's, or ONNX Runtime's on the CPU where it was faster, named beside its rate): a kernel "
        "that beats them reads above 1.",
        "Drift is against the fp32 reference: perplexity ratio, mean KL divergence (nats per token), "
        "top-1 agreement; gen match / gen prefix: greedy continuations identical to the reference's, and "
        "the mean tokens shared before they diverge (through the KV cache).",
    ]


def random_weight_caveat(records: list[dict[str, Any]]) -> list[str]:
    """A reading note for drift scored on models with random weights (``metrics.drift_meaningful: false``),
    raw text.
    """
    models = list(dict.fromkeys(r["model"] for r in records if drift_on_random_weights(r)))
    if not models:
        return []
    return [f"Drift of {', '.join(models)} is scored on random weights: it checks the mechanics, not the "
            "variants' accuracy, yet the recommendations and Pareto fronts weigh it as they would a trained "
            "model's."]


def drift_protocols(records: list[dict[str, Any]]) -> list[str]:
    """Each drift protocol the records' figures were scored under, raw text, in first-seen order.

    A perplexity is comparable with another tool's only under the same protocol, so the reports say which.
    """
    out = []
    for r in records:
        name = drift_protocol_name(r)
        if name:
            drift = r["method"]["drift"]
            # the protocol's words name the window length `context`: said as the number (escaped, backticks show)
            protocol = str(drift["protocol"]).replace("`context`", str(drift.get("context")))
            out.append(f"{name}, windows of {drift.get('context')} tokens, {drift.get('scored_tokens')} scored "
                       f"tokens: {protocol}")
    return list(dict.fromkeys(out))


def note_items(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(cell, note) pairs, raw text: the cause of failures and skips, labels, drift problems."""
    out = []
    for r in records:
        name = f"{r['model']} / {r['variant']} / {r['device']}"
        if r["status"] != "ok":
            cause = error_cause(r.get("error"))  # a traceback's exception line, not its first line
            out.append((name, f"{r['status']}: {clip(cause, 300)}" if cause else r["status"]))
        for x in (r.get("rounds") or {}).get("not_ok", []) if r["status"] == "ok" else []:
            which = f"round {x['round'] + 1}" if isinstance(x["round"], int) else "a round"
            out.append((name, f"{which} {x['status']}" + (f": {x['error']}" if x["error"] else "")
                        + ("" if short_of_rounds(r) else " (the cell has its ok rounds since)")))
        for label in r.get("labels", []):
            out.append((name, label))
        if r.get("drift_violations"):
            out.append((name, f"drift over budget: {'; '.join(r['drift_violations'])}"))
        if r.get("drift_error"):
            out.append((name, f"drift failed: {clip(error_cause(r['drift_error']), 300)}"))
    return list(dict.fromkeys(out))


NO_RECORDS = ("No cell records: results.jsonl holds none (the run was stopped, or is still running, before its "
              "first cell ended).")


def markdown_text(run: dict, records: list[dict]) -> str:
    """The Markdown report of a run description and its records (as ``read_run``/``read_records`` give them)."""
    lines = [f"# infermatrix run {md_code(run['matrix']['name'])}", "", *environment_lines(run, records)]
    groups = group_records(records)
    if not records:
        lines += ["", f"**{NO_RECORDS}**"]
    for g in groups:
        lines += ["", f"## {md_escape(g.title)}", ""]
        lines += group_table(g)
        lines += ["", f"Speedup: {md_escape(speedup_basis(g))}", ""]
        lines += recommendation_lines(g)
    lines += ["", "## How to read this", "",
              *(f"- {item}" for item in reading_notes("`~`") + random_weight_caveat(records))]
    lines += [f"- Drift protocol: {md_escape(text)}" for text in drift_protocols(records)]
    extra = note_items(records)
    if extra:
        lines += ["", "## Notes", "", *(f"- {md_escape(name)}: {md_escape(text)}" for name, text in extra)]
    return "\n".join(lines) + "\n"
