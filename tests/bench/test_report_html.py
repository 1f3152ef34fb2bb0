"""The HTML report read back as a page: table cells and their sort keys, the choice box, the run's facts,
the sections a run's records call for, and the committed example's page.

The figures are drawn but written as ``<svg/>`` (matplotlib's SVG writer takes seconds a page); the
test of the committed example compares everything but the figures' own markup, which matplotlib writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.report import plots
from bench.report.write import render
from tests.bench.example_records import example_records, first_repetitions
from tests.bench.records import record, write_run

EXAMPLE = Path(__file__).resolve().parents[2] / "reports" / "example"
VOID = {"meta", "br", "hr", "img", "input", "link", "svg"}  # svg: the placeholder <svg/>


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list = field(default_factory=list)  # Nodes and strings

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str, **attrs) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and all(c.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                    out.append(c)
                out += c.all(tag, **attrs)
        return out

    def one(self, tag: str, **attrs) -> Node:
        (node,) = self.all(tag, **attrs)
        return node

    def kids(self, tag: str) -> list[Node]:
        return [c for c in self.children if isinstance(c, Node) and c.tag == tag]


class _Tree(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    assert tree.stack == [tree.root], "unclosed elements: " + ", ".join(n.tag for n in tree.stack[1:])
    return tree.root


@pytest.fixture(autouse=True)
def drawn(monkeypatch) -> list[str]:
    """The title of each figure the page placed, in order (each written as ``<svg/>``)."""
    from matplotlib.figure import Figure

    plt, titles = plots._plt(), []

    def placeholder(fig) -> str:
        assert isinstance(fig, Figure)
        titles.append(fig.axes[0].get_title(loc="left"))
        plt.close(fig)
        return "<svg/>"

    monkeypatch.setattr(plots, "svg", placeholder)
    return titles


def without_figures(page: str) -> str:
    return re.sub(r"<svg\b.*?</svg>\s*", "<svg/>", page, flags=re.S)


def test_the_committed_example_page_is_what_this_version_renders():
    """reports/example is read as documentation: its page must follow its records and today's code."""
    assert render(EXAMPLE, "html") == without_figures((EXAMPLE / "report.html").read_text(encoding="utf-8")), (
        "regenerate: infermatrix report reports/example --format md,html,csv,png --out reports/example")


def _over_budget(variant: str, decode: float, kld: float) -> dict:
    r = record(variant, decode=decode, kld=kld)
    r["drift_ok"], r["drift_violations"] = False, [f"kld_mean {kld} > 0.1"]
    return r


@pytest.fixture
def page(tmp_path) -> Node:
    run = write_run(tmp_path / "run", [
        record("fp32", decode=100, kld=0.0, steps=0),
        record("q8", decode=180, noise=0.2, kld=0.002, steps=2),
        _over_budget("q4", decode=150, kld=0.3),
        record("broken", status="failed", error="boom\nsecond line"),
        record("gpu", status="skipped", error="needs CUDA"),
    ], name="<b>m</b>")
    return parse(render(run, "html"))


HEADERS = ["variant", "TTFT p50 ms [95% CI]", "TPOT p50 ms [95% CI]", "n", "speedup", "decode tok/s [95% CI]",
           "prefill tok/s [95% CI]", "roofline", "peak MiB", "weights MiB", "ppl ratio", "KLD mean", "top-1",
           "gen match", "gen prefix", "status"]


def _rows(table: Node) -> dict[str, list[Node]]:
    return {tr.kids("td")[0].text(): tr.kids("td") for tr in table.one("tbody").kids("tr")}


def test_the_table_has_a_column_per_figure_any_row_has_and_a_row_per_cell(page):
    table = page.one("table", class_="sortable")
    heads = table.one("thead").all("th")
    assert [th.text() for th in heads] == HEADERS
    assert [th.attrs.get("class") for th in heads] == [None] + ["num"] * (len(HEADERS) - 2) + [""]
    rows = table.one("tbody").kids("tr")
    assert [tr.kids("td")[0].text() for tr in rows] == ["fp32", "q8", "q4", "broken", "gpu"]
    assert all(len(tr.kids("td")) == len(HEADERS) for tr in rows)
    assert [tr.attrs.get("class") for tr in rows] == [None, "chosen", None, None, None]
    # the variant cell sorts by name and names the recipe's steps on hover
    assert [(tr.kids("td")[0].attrs["data-v"], tr.kids("td")[0].attrs["title"]) for tr in rows] == [
        ("fp32", "reference"), ("q8", "x, x"), ("q4", "x"), ("broken", "x"), ("gpu", "x")]


def test_a_cell_shows_its_figure_and_interval_and_sorts_by_the_unrounded_value(page):
    rows = _rows(page.one("table", class_="sortable"))
    col = {h: i for i, h in enumerate(HEADERS)}
    tpot = rows["q4"][col["TPOT p50 ms [95% CI]"]]
    assert tpot.attrs == {"class": "num", "data-v": repr(1e3 / 150),
                          "title": "95% CI width 4% of the value (noisy above 10%); it holds the median 93.75% of "
                                   "the time (5 repetitions)"}
    assert tpot.text() == "6.67 [6.54, 6.80]" and tpot.one("span", class_="ci").text() == "[6.54, 6.80]"
    # a noisy figure: marked, shaded, its interval still shown
    noisy = rows["q8"][col["decode tok/s [95% CI]"]]
    assert noisy.attrs["class"] == "num noisy" and noisy.attrs["data-v"] == "180.0"
    assert noisy.one("span", class_="mark").text() == "~" and noisy.text() == "180.0 ~ [144.0, 216.0]"
    assert noisy.attrs["title"].startswith("95% CI width 40% of the value (noisy above 10%); it holds")
    # drift figures have no bracketed interval; the KLD's standard error still says how noisy it is
    kld = rows["q8"][col["KLD mean"]]
    assert kld.text() == "2.00e-03" and kld.attrs["data-v"] == "0.002" and not kld.all("span")
    # memory sorts by bytes, shows MiB
    assert rows["q8"][col["peak MiB"]].text() == "400.0"
    assert rows["q8"][col["peak MiB"]].attrs["data-v"] == repr(float(400 * 2**20))
    n = rows["q8"][col["n"]]
    assert (n.text(), n.attrs["data-v"]) == ("5", "5.0")


def test_speedup_cells_show_the_ratio_its_interval_and_the_reference(page):
    rows = _rows(page.one("table", class_="sortable"))
    i = HEADERS.index("speedup")
    ref, q4 = rows["fp32"][i], rows["q4"][i]
    assert (ref.text(), ref.attrs["data-v"], ref.one("span", class_="ci").text()) == ("1.00x (ref)", "1.0", "(ref)")

    def e2e(decode):  # the hand-made records' e2e p50 (no noise at the median)
        return 10.0 + 31 * 1e3 / decode

    assert float(q4.attrs["data-v"]) == pytest.approx(e2e(100) / e2e(150))
    assert re.fullmatch(r"1\.48x \[1\.4\d, 1\.5\d\]", q4.text())


def test_status_cells_badge_the_outcome_and_a_drift_budget_overrun(page):
    rows = _rows(page.one("table", class_="sortable"))
    status = {v: cells[-1] for v, cells in rows.items()}
    assert {v: (c.attrs["data-v"], [(s.attrs["class"], s.text()) for s in c.all("span")])
            for v, c in status.items()} == {
        "fp32": ("ok", [("badge ok", "ok")]),
        "q8": ("ok", [("badge ok", "ok")]),
        "q4": ("ok", [("badge ok", "ok"), ("badge warn", "over budget")]),
        "broken": ("failed", [("badge failed", "failed")]),
        "gpu": ("skipped", [("badge skipped", "skipped")]),
    }
    # a cell with no figure is a dash that sorts last (empty key)
    for v in ("broken", "gpu"):
        assert all((c.text(), c.attrs["data-v"]) == ("-", "") for c in rows[v][1:-1])


def test_the_choice_box_names_the_choice_the_front_and_why_each_other_variant_lost(page):
    box = page.one("div", class_="rec")
    items = [li.text() for li in box.kids("ul")[0].kids("li")]
    assert items == ["Recommended: q8: decode tok/s 180.0 [144.0, 216.0] is tied within noise with q4; the choice "
                     "rests on the tie-break: lower KLD than q4",
                     "Pareto front (decode tok/s against KLD): fp32, q8",
                     "Dominated (another variant clearly better on decode tok/s or KLD and at least as good, within "
                     "noise, on the other): q4 (by q8)"]
    why = {li.one("b").text(): li.text() for li in box.one("details").all("li")}
    assert set(why) == {"fp32", "q4", "gpu", "broken"}
    assert why["fp32"].startswith("fp32 [lost]: decode tok/s 100.0 [98.0, 102.0] vs q8's 180.0")
    assert why["q4"].startswith("q4 [lost]: dominated by q8 (")
    assert why["gpu"] == "gpu [skipped]: skipped: needs CUDA"
    assert why["broken"] == "broken [failed]: failed: boom"


def test_with_no_figure_to_choose_on_or_no_reference_the_page_says_so(tmp_path, drawn):
    run = write_run(tmp_path / "run", [record("broken", status="failed", error="boom")])
    page = render(run, "html")
    assert ('</h2><div class="rec">Nothing to recommend: no variant has every figure the choice needs.</div>'
            '<div class="table-wrap">') in page
    assert parse(page).one("p", class_="note").text().startswith(
        "Speedup: none: no ok reference variant in this group")
    assert drawn == []  # nothing ok: no figure


def test_a_run_without_records_says_so(tmp_path):
    from bench.report.markdown import NO_RECORDS

    page = render(write_run(tmp_path / "run", []), "html")
    assert f"</dl><p><b>{NO_RECORDS}</b></p><section><h2>How to read this</h2>" in page
    assert "No cell records" in NO_RECORDS


def test_the_header_and_environment_give_the_run_facts(page, tmp_path):
    assert page.one("title").text() == "infermatrix: <b>m</b>"  # escaped: text, not markup
    assert page.one("header").one("code").text() == "<b>m</b>"
    assert page.one("div", class_="sub").text() == "5 cells: 3 ok, 1 skipped, 1 failed"
    env = page.one("dl", class_="env")
    facts = dict(zip([dt.text() for dt in env.kids("dt")], [dd.text() for dd in env.kids("dd")], strict=True))
    assert facts == {"started / ended": "2026-01-01T00:00:00Z / 2026-01-01T00:01:00Z", "launcher": "local",
                     "CPU": "Test CPU (2 logical cores), RAM 16.0 GiB", "GPUs": "none", "libraries": "torch 2.x",
                     "git": "0123456789ab", "cpu ceilings (measured)": "copy 25.0 GB/s; matmul float32 300 GFLOP/s"}


def test_a_shard_of_a_dirty_tree_says_both(tmp_path):
    import json

    run = write_run(tmp_path / "run", [record("fp32")])
    meta = json.loads((run / "run.json").read_text())
    meta["shard"] = "2/4"
    meta["environment"]["git"]["dirty"] = True
    (run / "run.json").write_text(json.dumps(meta))
    env = parse(render(run, "html")).one("dl", class_="env")
    facts = dict(zip([dt.text() for dt in env.kids("dt")], [dd.text() for dd in env.kids("dd")], strict=True))
    assert facts["launcher"] == "local, shard 2/4" and facts["git"] == "0123456789ab (dirty)"


def test_a_bare_run_description_reads_as_unknown_and_unfinished(tmp_path):
    """run.json requires only the matrix: a run that never finished, or a hand-made one, still renders."""
    import json

    run = write_run(tmp_path / "run", [record("fp32")])
    (run / "run.json").write_text(json.dumps({"schema_version": 1, "matrix": {"name": "bare"}}))
    env = parse(render(run, "html")).one("dl", class_="env")
    facts = dict(zip([dt.text() for dt in env.kids("dt")], [dd.text() for dd in env.kids("dd")], strict=True))
    assert facts == {"started / ended": "? / not ended (interrupted, or still running)", "launcher": "?",
                     "CPU": "? (? logical cores), RAM ?", "GPUs": "none", "git": "?"}  # no empty libraries row
    md = render(run, "md").splitlines()
    assert md[2:6] == ["- started ?, not ended (interrupted, or still running); launcher ?",
                       "- CPU ? (? logical cores), RAM ?, GPUs: none", "- git ?", ""]


def test_two_scenarios_are_enough_for_a_contents_list_and_free_form_recipe_steps_are_named(tmp_path):
    odd = record('o"d d=\'<x>', decode=90)  # a name that would end an attribute, or open a tag, unescaped
    odd["recipe"]["steps"] = [{"technique": "cast"}, {"name": "older-record"}, "onnx", {}]
    other = {"name": "decode", "batch_size": 2, "prompt_tokens": 64, "new_tokens": 16}
    page = parse(render(write_run(tmp_path / "run", [odd, record("fp32", scenario=other)]), "html"))
    assert page.one("h3").text() == "Scenarios" and len(page.one("main").kids("ul")[0].kids("li")) == 2
    name = page.all("table")[0].one("tbody").kids("tr")[0].kids("td")[0]
    assert name.attrs == {"data-v": 'o"d d=\'<x>', "title": "cast, older-record, onnx, ?"}
    assert name.text() == 'o"d d=\'<x>'


def _h2(page: Node) -> list[str]:
    return [h.text() for h in page.all("h2")]


def test_one_scenario_gets_no_contents_list_and_its_four_figures(page, drawn):
    assert drawn == ["Speed against drift (tiny, cpu, generate)", "Decode throughput", "Memory and size",
                     "TTFT distribution"]
    assert _h2(page) == ["tiny on cpu: generate, batch 1, prompt 128, new 32", "How to read this", "Notes"]
    assert not page.all("h3")
    section = page.one("section", id="g0")
    assert [f.one("figcaption").text() for f in section.all("figure")] == [
        "Speed against drift; dashed: the Pareto front.",
        "Decode tokens/s with 95% CI of the median; roofline fraction.",
        "Peak memory of the cell process and the weights' size.",
        "Every repetition's TTFT and TPOT; boxes: quartiles."]
    assert all(len(f.kids("svg")) == 1 for f in section.all("figure"))
    note = section.one("p", class_="note").text()
    assert note == ("Speedup: fp32 p50 e2e_ms / the variant's, with a bootstrap 95% interval. "
                    "~: 95% interval wider than 10% of the value, or fewer than 5 repetitions (a speedup: on either "
                    "side).")
    notes = [li.text() for li in page.all("ul", class_="notes")[0].kids("li")]
    assert notes[1].startswith("~ marks a noisy figure: its 95% interval is wider than 10%")
    extra = [li.text() for li in page.all("ul", class_="notes")[1].kids("li")]
    assert extra == ["tiny / q4 / cpu: drift over budget: kld_mean 0.3 > 0.1", "tiny / broken / cpu: failed: boom",
                     "tiny / gpu / cpu: skipped: needs CUDA"]


def test_several_scenarios_get_a_contents_list_a_sweep_section_and_the_drift_protocols(tmp_path, drawn):
    sweep = {"name": "decode", "prompt_tokens": 64, "new_tokens": 16}

    def with_protocol(variant, name, text):
        r = record(variant, decode=100, kld=0.0 if variant == "fp32" else 0.01, steps=0 if variant == "fp32" else 1)
        r["method"]["drift"] = {"protocol": text, "protocol_name": name, "context": 64, "scored_tokens": 512}
        return r

    run = write_run(tmp_path / "run", [
        with_protocol("fp32", "strided", "every window scored"), with_protocol("q8", "first", "first window only"),
        *[record("fp32", decode=100 * b, kld=None, steps=0, scenario={**sweep, "batch_size": b, "prompt_tokens": p})
          for b, p in ((1, 64), (2, 64), (1, 32))]])
    page = parse(render(run, "html"))
    titles = ["tiny on cpu: generate, batch 1, prompt 128, new 32", "tiny on cpu: decode, batch 1, prompt 64, new 16",
              "tiny on cpu: decode, batch 2, prompt 64, new 16", "tiny on cpu: decode, batch 1, prompt 32, new 16"]
    assert _h2(page) == [*titles, "Sweeps", "How to read this", "Drift protocol"]
    assert page.one("h3").text() == "Scenarios"
    contents = page.one("main").kids("ul")[0]
    assert [(a.attrs["href"], a.text()) for a in contents.all("a")] == [(f"#g{i}", t) for i, t in enumerate(titles)]
    assert contents.children == contents.kids("li")  # nothing between the items
    assert [s.attrs["id"] for s in page.all("section") if "id" in s.attrs] == ["g0", "g1", "g2", "g3"]
    sweeps = next(s for s in page.all("section") if s.one("h2").text() == "Sweeps")
    assert [f.one("figcaption").text() for f in sweeps.all("figure")] == [
        "Throughput against batch size.", "TTFT against prompt length."]
    assert drawn[-2:] == ["Decode throughput against batch size", "TTFT against prompt length"]
    protocols = next(s for s in page.all("section") if s.one("h2").text() == "Drift protocol").one("ul")
    assert protocols.children == protocols.kids("li") and [li.text() for li in protocols.kids("li")] == [
        "strided, windows of 64 tokens, 512 scored tokens: every window scored",
        "first, windows of 64 tokens, 512 scored tokens: first window only"]


def test_a_figure_on_too_few_repetitions_says_how_often_its_interval_holds_the_median(tmp_path):
    page = parse(render(write_run(tmp_path / "run", [record("one", reps=1), record("two", reps=2, noise=0.01)]),
                        "html"))
    rows = _rows(page.one("table", class_="sortable"))
    one, two = rows["one"][HEADERS.index("TPOT p50 ms [95% CI]")], rows["two"][HEADERS.index("TPOT p50 ms [95% CI]")]
    assert one.attrs["class"] == "num noisy" and one.text() == "10.00 ~"  # no interval ([x, x] covers nothing), marked
    assert one.attrs["title"] == "no interval: one repetition ([x, x] holds the median 0% of the time)"
    assert two.attrs["title"].endswith("; it holds the median 50.00% of the time (2 repetitions)")


def test_a_speedup_on_too_few_repetitions_is_marked_and_shaded_as_a_figure_is(tmp_path):
    """The example's fp32 and bf16 cells as they would read after 2 repetitions."""
    records = [first_repetitions(r, 2) for r in example_records() if r["variant"] in ("fp32", "bf16")]
    page = parse(render(write_run(tmp_path / "run", records), "html"))
    table = page.one("table", class_="sortable")
    i = [th.text() for th in table.one("thead").all("th")].index("speedup")
    rows = _rows(table)
    cell, ref = rows["bf16"][i], rows["fp32"][i]
    assert cell.attrs["class"] == "num noisy" and cell.text() == "1.14x ~ [1.10, 1.18]"
    assert cell.one("span", class_="mark").text() == "~" and cell.one("span", class_="ci").text() == "[1.10, 1.18]"
    assert cell.attrs["title"] == ("noisy: its interval is wider than 10% of the ratio, or the reference's or this "
                                   "variant's figure rests on fewer than 5 repetitions")
    assert ref.attrs["class"] == "num" and ref.text() == "1.00x (ref)"
