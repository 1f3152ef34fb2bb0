"""A self-contained HTML report: the Markdown report's tables (sortable) plus inline SVG figures.

Nothing is fetched: styles, the sorting script and the figures are inline. Every string
that came from input (model, variant and recipe names, errors, labels) goes through
``esc``; the figures' text is escaped by matplotlib's SVG writer.
"""

from __future__ import annotations

import html
import math
from typing import Any

from bench.catalogue import METRICS
from bench.report import plots
from bench.report.markdown import (
    NO_RECORDS,
    drift_protocols,
    group_columns,
    note_items,
    random_weight_caveat,
    reading_notes,
    run_facts,
)
from bench.report.table import NOISY_REL_CI, Group, Row, group_records, speedup_basis, speedup_parts, sweeps
from bench.select import decide, default_objective, front_text


def esc(value: Any) -> str:
    return html.escape(str(value))  # quotes too: values go into attributes


STYLE = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dee7; --bg:#f6f7f9; --accent:#2458b3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 20px; font-weight: 600; }
header code { background: #323b4d; color: #fff; padding: 1px 6px; border-radius: 4px; }
header .sub { color: #b9c2d3; font-size: 13px; }
main { padding: 8px 32px 40px; max-width: 1500px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; color: var(--muted); }
dl.env { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 12px 0; font-size: 13px; }
dl.env dt { color: var(--muted); } dl.env dd { margin: 0; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 12.5px; width: 100%; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: var(--bg); text-align: left; font-weight: 600; white-space: normal; vertical-align: bottom;
     cursor: pointer; user-select: none; position: sticky; top: 0; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 9px; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 9px; }
tr:hover td { background: #f0f4fb; }
td .ci { display: block; color: var(--muted); font-size: 10.5px; line-height: 1.2; }
td.noisy { background: #fff6e0; }
td .mark { color: #b7791f; font-weight: 700; }
details { margin-top: 6px; font-size: 12.5px; } summary { cursor: pointer; color: var(--accent); }
tr.chosen td:first-child { font-weight: 700; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 11.5px; font-weight: 600; }
.badge.ok { background: #e3f4e8; color: #1e7a3d; } .badge.failed { background: #fde7e7; color: #b42323; }
.badge.skipped { background: #eceef2; color: #5b6475; } .badge.warn { background: #fff1d6; color: #9a5b00; }
.rec { background: #eef4ff; border-left: 4px solid var(--accent); padding: 10px 14px; margin: 12px 0;
       border-radius: 0 6px 6px 0; }
.rec ul { margin: 6px 0 0; padding-left: 18px; } .rec li { margin: 2px 0; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; margin-top: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px; background: #fff; }
figure svg { width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.note { color: var(--muted); font-size: 12.5px; }
ul.notes { font-size: 13px; } code { background: var(--bg); padding: 0 4px; border-radius: 3px; }
"""

# Sorting by header click; a load check that records failed resources and script errors on <html>
# (data-load-errors) so a headless browser can read the outcome from the DOM.
SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target || {};
    errors.push((t.tagName ? t.tagName + ' ' + (t.src || t.href || '') : String(e.message)));
  }, true);
  function key(td) {
    var v = td.getAttribute('data-v');
    return v === null || v === '' ? null : (isNaN(+v) ? v.toLowerCase() : +v);
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
        table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', dir);
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (x === null) return 1; if (y === null) return -1;
          var c = x < y ? -1 : x > y ? 1 : 0;
          return dir === 'ascending' ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  window.addEventListener('load', function () {
    document.querySelectorAll('img').forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) errors.push('IMG ' + img.src.slice(0, 60));
    });
    var root = document.documentElement;
    root.setAttribute('data-load-errors', String(errors.length));
    root.setAttribute('data-load-error-list', errors.join(' | '));
    root.setAttribute('data-figures', String(document.querySelectorAll('figure svg, figure img').length));
    root.setAttribute('data-ready', 'yes');
  });
})();
"""


SPEEDUP_NOISY = (f"noisy: its interval is wider than {NOISY_REL_CI:.0%} of the ratio, or the reference's or this "
                 "variant's figure rests on fewer than 5 repetitions")


def _num_attr(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(float(value))


def _cell(row: Row, key: str) -> str:
    if key == "speedup":
        v = row.speedup[0] if row.speedup else None
        main, ci = speedup_parts(row)
        ci_html = f' <span class="ci">{esc(ci)}</span>' if ci else ""
        if not row.speedup_noisy:
            return f'<td class="num" data-v="{_num_attr(v)}">{esc(main)}{ci_html}</td>'
        return (f'<td class="num noisy" data-v="{_num_attr(v)}" title="{esc(SPEEDUP_NOISY)}">{esc(main)} '
                f'<span class="mark">~</span>{ci_html}</td>')
    if key == "status":
        drift = row.drift_text()
        badge = f'<span class="badge {esc(row.status)}">{esc(row.status)}</span>'
        if drift not in ("-", "ok"):
            badge += f' <span class="badge warn">{esc(drift)}</span>'
        return f'<td data-v="{esc(row.status)}">{badge}</td>'
    if key == "n":
        n = row.figures["ttft_ms"].n
        return f'<td class="num" data-v="{_num_attr(n)}">{n if n else "-"}</td>'
    fig, m = row.figures[key], METRICS[key]
    show_ci = fig.ci is not None and fig.value is not None and m.kind != "drift"
    ci = f' <span class="ci">[{esc(m.format(fig.ci[0]))}, {esc(m.format(fig.ci[1]))}]</span>' if show_ci else ""
    cls = "num noisy" if fig.noisy else "num"
    cover = (f"; it holds the median {fig.coverage:.2%} of the time ({fig.n} repetition{'s' * (fig.n != 1)})"
             if fig.coverage is not None and fig.coverage < 0.95 else "")
    title = (f' title="95% CI width {fig.rel_ci_width:.0%} of the value (noisy above {NOISY_REL_CI:.0%}){cover}"'
             if fig.rel_ci_width is not None else
             ' title="no interval: one repetition ([x, x] holds the median 0% of the time)"' if fig.coverage == 0
             else "")
    mark = ' <span class="mark">~</span>' if fig.noisy else ""
    return f'<td class="{cls}" data-v="{_num_attr(fig.value)}"{title}>{esc(m.format(fig.value))}{mark}{ci}</td>'


def _step_name(step: Any) -> str:
    """A recipe step's technique (the record contract leaves steps free-form: older records name them)."""
    if isinstance(step, dict):
        return str(step.get("technique") or step.get("name") or "?")
    return str(step)


def group_table(group: Group, chosen: str | None) -> str:
    columns = group_columns(group)
    head = "".join(f'<th class="{"" if k == "status" else "num"}">{esc(h)}</th>' for h, k in columns)
    rows = []
    for row in group.rows:
        cls = ' class="chosen"' if row.variant == chosen else ""
        recipe = row.record.get("recipe") or {}
        steps = ", ".join(_step_name(s) for s in recipe.get("steps") or [])
        rows.append(f'<tr{cls}><td data-v="{esc(row.variant)}" title="{esc(steps or "reference")}">'
                    f'{esc(row.variant)}</td>' + "".join(_cell(row, k) for _, k in columns) + "</tr>")
    return (f'<div class="table-wrap"><table class="sortable"><thead><tr><th>variant</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _figure(fig, caption: str) -> str:
    if fig is None:
        return ""
    return f"<figure>{plots.svg(fig)}<figcaption>{esc(caption)}</figcaption></figure>"


def group_section(group: Group, index: int) -> str:
    d = decide(group, default_objective(group), [])
    if d.chosen:
        dominated = [v for v in d.verdicts.values() if v.dominated_by]
        items = [f"<li><b>Recommended: {esc(d.chosen)}</b>: {esc(d.verdicts[d.chosen].reason)}</li>",
                 f"<li>Pareto front ({esc(d.objective.label)} against KLD): {esc(front_text(d))}</li>"]
        if dominated:
            short = ", ".join(f"{v.variant} (by {v.dominated_by})" for v in dominated)
            items.append(f"<li>Dominated (another variant clearly better on {esc(d.objective.label)} or KLD and at "
                         f"least as good, within noise, on the other): {esc(short)}</li>")
        why = "".join(f"<li><b>{esc(v.variant)}</b> [{esc(v.outcome)}]: {esc(v.reason)}</li>"
                      for v in d.verdicts.values() if v.outcome != "chosen")
        rec = ('<div class="rec"><b>Choice with no constraints</b> (<code>infermatrix select</code>; add '
               f'<code>--max-kld</code>, <code>--max-memory-mib</code>, ... for yours)<ul>{"".join(items)}</ul>'
               f'<details><summary>why each other variant lost</summary><ul>{why}</ul></details></div>')
    else:
        rec = '<div class="rec">Nothing to recommend: no variant has every figure the choice needs.</div>'
    figs = "".join([
        _figure(plots.speed_vs_drift(group), "Speed against drift; dashed: the Pareto front."),
        _figure(plots.throughput_bars(group), "Decode tokens/s with 95% CI of the median; roofline fraction."),
        _figure(plots.memory_bars(group), "Peak memory of the cell process and the weights' size."),
        _figure(plots.latency_distributions(group), "Every repetition's TTFT and TPOT; boxes: quartiles."),
    ])
    return (f'<section id="g{index}"><h2>{esc(group.title)}</h2>{rec}{group_table(group, d.chosen)}'
            f'<p class="note">Speedup: {esc(speedup_basis(group))} <code>~</code>: 95% interval wider than '
            f'{NOISY_REL_CI:.0%} of the value, or fewer than 5 repetitions (a speedup: on either side).</p>'
            f'<div class="figs">{figs}</div></section>')


def environment_html(run: dict[str, Any], records: list[dict[str, Any]] | None = None) -> str:
    f = run_facts(run, records)
    rows = [("started / ended", f"{f.pop('started')} / {f.pop('ended')}"), *f.items()]
    return '<dl class="env">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows if v) + "</dl>"


def html_text(run: dict, records: list[dict]) -> str:
    """The HTML report of a run description and its records (as ``read_run``/``read_records`` give them)."""
    groups = group_records(records)
    name = run["matrix"]["name"]
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    sub = f"{len(records)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    toc = "".join(f'<li><a href="#g{i}">{esc(g.title)}</a></li>' for i, g in enumerate(groups))
    body = [environment_html(run, records)]
    if not records:
        body.append(f"<p><b>{esc(NO_RECORDS)}</b></p>")
    if len(groups) > 1:
        body.append(f"<h3>Scenarios</h3><ul>{toc}</ul>")
    body += [group_section(g, i) for i, g in enumerate(groups)]
    swept = sweeps(records)
    sweep_figs = "".join([
        _figure(plots.sweep_plot(swept["batch_size"], "batch_size"), "Throughput against batch size."),
        _figure(plots.sweep_plot(swept["prompt_tokens"], "prompt_tokens"), "TTFT against prompt length."),
    ])
    if sweep_figs:
        body.append(f'<section><h2>Sweeps</h2><div class="figs">{sweep_figs}</div></section>')
    reading = "".join(f"<li>{esc(item)}</li>" for item in reading_notes("~") + random_weight_caveat(records))
    body.append(f'<section><h2>How to read this</h2><ul class="notes">{reading}</ul></section>')
    protocols = drift_protocols(records)
    if protocols:
        items = "".join(f"<li>{esc(text)}</li>" for text in protocols)
        body.append(f'<section><h2>Drift protocol</h2><ul class="notes">{items}</ul></section>')
    extra = note_items(records)
    if extra:
        items = "".join(f"<li><b>{esc(name)}</b>: {esc(text)}</li>" for name, text in extra)
        body.append(f'<section><h2>Notes</h2><ul class="notes">{items}</ul></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>infermatrix: {esc(name)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>infermatrix run <code>{esc(name)}</code></h1><div class=\"sub\">{esc(sub)}</div></header>"
            f"<main>{''.join(body)}</main><script>{SCRIPT}</script></body></html>\n")
