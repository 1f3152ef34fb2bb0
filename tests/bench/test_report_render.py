"""Details of the Markdown and CSV reports: escaping, partial environments, the flat CSV row."""

from __future__ import annotations

import csv
import io

from bench.report.csv import csv_report
from bench.report.markdown import (
    NO_RECORDS,
    ceiling_texts,
    environment_lines,
    group_table,
    md_escape,
    note_items,
    recommendation_lines,
)
from bench.report.table import group_records
from bench.report.write import render
from tests.bench.example_records import example_records, first_repetitions
from tests.bench.records import record, write_run


def test_markdown_cells_escape_backslashes_pipes_and_html_and_stay_on_one_line():
    assert md_escape("a\\|b <script>\n  c") == "a\\\\\\|b &lt;script&gt; c"
    assert md_escape(3.5) == "3.5"


def test_markdown_data_makes_no_link_image_code_span_or_emphasis():
    """A name or error from a record is shown as itself: in a PR comment an image would be fetched."""
    assert md_escape("![x](https://e.test/p.png)") == "![x\\](https://e.test/p.png)"
    assert md_escape("[docs](https://e.test)") == "[docs\\](https://e.test)"
    assert md_escape("`rm -rf` *bold*") == "\\`rm -rf\\` \\*bold\\*"
    assert md_escape("1.2 [1.0, 1.4] pip install 'x[gpu]'") == "1.2 [1.0, 1.4] pip install 'x[gpu]'"  # as they are


def test_a_code_span_holds_any_text_whole():
    from bench.report.markdown import md_code

    assert md_code("runs/base") == "`runs/base`"
    assert md_code("a`b") == "``a`b``"  # a longer fence than any run of backticks inside
    assert md_code("`x") == "`` `x ``" and md_code("x`") == "`` x` ``" and md_code("a```b\nc") == "````a```b c````"


def test_environment_lines_of_a_run_recorded_without_an_environment():
    lines = environment_lines({"started": "s", "ended": "e", "launcher": "local"})
    assert lines[0] == "- started s, ended e; launcher local"
    assert lines[1] == "- CPU ? (? logical cores), RAM ?, GPUs: none"  # not recorded, not zero
    assert lines[2:] == ["- git ?"]  # no empty libraries line
    with_libs = environment_lines({"environment": {"libraries": {"torch": "2.13.0"}, "git": {"commit": "ab" * 20,
                                                                                           "dirty": True}}})
    assert with_libs[2] == "- torch 2.13.0" and with_libs[3] == f"- git {'ab' * 6} (dirty)"
    shard = environment_lines({"started": "s", "ended": "e", "launcher": "ray", "shard": "2/4"})
    assert shard[0] == "- started s, ended e; launcher ray, shard 2/4"
    assert environment_lines({"started": "s", "ended": None})[0] == (
        "- started s, not ended (interrupted, or still running); launcher ?")


def _rows(records):
    return list(csv.DictReader(io.StringIO(csv_report(records))))


def test_the_csv_row_leaves_unknown_and_structured_metrics_out():
    r = record("fp32", steps=0, kld=None)
    r["metrics"]["not_a_metric"] = 1.0  # a key from another version
    r["metrics"]["roofline_ceilings"] = {"copy": {"gbps": 30.0}}  # an object: no flat column
    (row,) = _rows([r])
    assert "not_a_metric" not in row and not any(k.startswith("roofline_ceilings") for k in row)
    assert row["ttft_ms_p50"] == "10.0" and row["peak_memory_bytes"] == str(400 * 2**20)


def test_csv_identity_columns_are_empty_where_the_record_has_nothing():
    failed = record("broken", status="failed", error="first line\nsecond")
    (row,) = _rows([failed])
    assert (row["error"], row["drift_ok"], row["drift_protocol"], row["reference_variant"]) == \
        ("first line", "", "", "")
    assert row["speedup_vs_reference"] == ""
    ok = record("fp32", steps=0)
    ok["method"]["drift"] = {"protocol": {"first": 1}, "protocol_name": "all-but-first"}
    (row,) = _rows([ok])
    assert (row["drift_ok"], row["drift_protocol"], row["reference_variant"]) == ("True", "all-but-first", "fp32")


def test_a_summary_metric_recorded_as_null_leaves_its_columns_empty():
    r = record("fp32", steps=0)
    r["metrics"]["ttft_ms"] = None  # a figure the cell could not take
    (row,) = _rows([r, record("q8")])[:1]
    assert all(row[f"ttft_ms_{f}"] == "" for f in ("p50", "ci95_low", "ci95_high", "n"))
    assert row["tpot_ms_p50"] != ""


def _table(records):
    (group,) = group_records(records)
    header, _, *rows = group_table(group)
    return [h.strip() for h in header.strip("|").split("|")], \
        [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_the_status_column_says_when_a_variant_drifted_past_its_budget_or_its_drift_failed():
    over = record("q4", kld=0.3)
    over.update(drift_ok=False, drift_violations=["kld_mean 0.3 > 0.1", "top1_agreement 0.7 < 0.9"])
    broken = record("q8")
    broken.update(drift_ok=False, drift_violations=[], drift_error="Traceback\n  ...\nRuntimeError: " + "m" * 400)
    header, rows = _table([record("fp32", steps=0, kld=0.0), over, broken])
    status = [row[header.index("status")] for row in rows]
    assert status == ["ok", "ok, over budget", "ok, drift failed"]
    notes = note_items([over, broken])
    assert notes == [("tiny / q4 / cpu", "drift over budget: kld_mean 0.3 > 0.1; top1_agreement 0.7 < 0.9"),
                     ("tiny / q8 / cpu", "drift failed: " + ("RuntimeError: " + "m" * 400)[:299] + "\u2026")]


def test_columns_no_row_has_are_left_out_and_status_always_stays():
    a, b = record("fp32", decode=None, kld=None, steps=0), record("q8", decode=None, kld=None)
    header, rows = _table([a, b])
    assert header == ["variant", "peak MiB", "weights MiB", "status"]  # no latency: no n, no speedup
    assert rows == [["fp32", "400.0", "40.0", "ok"], ["q8", "400.0", "40.0", "ok"]]


def test_a_group_without_a_speed_figure_has_nothing_to_recommend():
    (group,) = group_records([record("fp32", steps=0, decode=None), record("q8", decode=None)])
    assert recommendation_lines(group) == ["- nothing to recommend: no variant has every figure the choice needs"]


def test_notes_give_the_first_line_of_an_error_cut_at_300_characters_and_each_label_once():
    long = record("big", status="failed", error="x" * 400 + "\nsecond line")
    silent = record("quiet", status="skipped")
    silent["error"] = None  # skipped with no reason recorded
    labelled = record("fp32", steps=0)
    labelled["labels"] = ["noisy neighbour", "noisy neighbour", "thermal"]
    older = record("fp32", steps=0, model="older")
    del older["labels"]  # a record from before labels
    assert note_items([long, silent, labelled, older]) == [
        ("tiny / big / cpu", "failed: " + "x" * 299 + "\u2026"), ("tiny / quiet / cpu", "skipped"),
        ("tiny / fp32 / cpu", "noisy neighbour"), ("tiny / fp32 / cpu", "thermal")]


def test_the_markdown_of_a_run_without_records_is_its_heading_environment_and_the_reason(tmp_path):
    lines = render(write_run(tmp_path / "run", []), "md").splitlines()
    assert lines[0] == "# infermatrix run `handmade`" and lines[1] == ""
    at = lines.index(f"**{NO_RECORDS}**")
    assert lines[2:at - 1] == environment_lines(__import__("json").loads((tmp_path / "run/run.json").read_text()))
    assert lines[at - 1] == "" and lines[at + 1:at + 4] == ["", "## How to read this", ""]


def test_a_group_without_an_ok_reference_says_so_under_its_table(tmp_path):
    text = render(write_run(tmp_path / "run", [record("q8"), record("q4")]), "md")
    assert ("\nSpeedup: none: no ok reference variant in this group (fp32, or a variant whose recipe has no "
            "steps).\n") in text


def test_drift_on_random_weights_is_called_out_once_in_each_report(tmp_path):
    records = [record("fp32", kld=0.0, steps=0), record("q8"), record("fp32", model="trained", kld=0.0, steps=0)]
    for r in records[:2]:
        r["metrics"]["drift_meaningful"] = False  # where a cell stores it
    records[2]["metrics"]["drift_meaningful"] = True
    run = write_run(tmp_path / "run", records)
    caveat = ("Drift of tiny is scored on random weights: it checks the mechanics, not the variants' accuracy, yet "
              "the recommendations and Pareto fronts weigh it as they would a trained model's.")
    md = render(run, "md")
    assert md.count(caveat) == 1 and f"\n- {caveat}\n" in md.split("## How to read this")[1]
    assert render(run, "html").count(caveat.replace("'", "&#x27;")) == 1
    assert "random weights" not in render(write_run(tmp_path / "trained", records[2:]), "md")


def test_ceilings_read_in_gflops_and_a_run_without_matmul_ceilings_gives_its_copy_bandwidth_alone():
    run = {"roofline": {"cuda": {"memory": {"bandwidth_gbps": 4108.04}, "matmul": {"bfloat16": {"tflops": 0.1234},
                                                                                   "float32": {"tflops": 51.2}}},
                        "cpu": {"memory": {"bandwidth_gbps": 25.0}}}}
    assert ceiling_texts(run) == {"cuda": "copy 4108.0 GB/s; matmul bfloat16 123 GFLOP/s, float32 51200 GFLOP/s",
                                  "cpu": "copy 25.0 GB/s"}
    assert ceiling_texts({}) == {}


def test_names_and_errors_a_spreadsheet_would_run_as_formulas_are_defused():
    hostile = record('=cmd|" /C calc"!A0', model="@SUM(1)")
    broken = record("+x", status="failed", error="-2+3\nmore")
    rows = {row["variant"]: row for row in _rows([record("fp32", steps=0), hostile, broken])}
    assert set(rows) == {"fp32", "'=cmd|\" /C calc\"!A0", "'+x"}
    assert rows["'+x"]["error"] == "'-2+3" and rows["'=cmd|\" /C calc\"!A0"]["model"] == "'@SUM(1)"
    assert rows["fp32"]["ttft_ms_p50"] == "10.0"  # figures are never touched (a negative number stays one)


def test_the_formula_guard_covers_each_leading_character_and_leaves_other_values():
    from bench.report.csv import cell_text

    assert [cell_text(c + "x") for c in "=+-@\t\r"] == ["'" + c + "x" for c in "=+-@\t\r"]
    assert [cell_text(v) for v in ("", "a=b", "x-1", -1.5, None, True)] == ["", "a=b", "x-1", -1.5, None, True]


def test_a_figure_on_fewer_than_five_repetitions_is_marked_noisy_whatever_its_width(tmp_path):
    text = render(write_run(tmp_path / "run", [record("fp32", reps=1, steps=0), record("q8", reps=4, noise=0.01),
                                               record("q4", reps=5, noise=0.01)]), "md")
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| q") or
            line.startswith("| fp32")}
    assert "| 10.00 ~ |" in rows["fp32"]  # one repetition: no interval ([x, x] covers nothing), still marked
    assert "| 10.00 [9.90, 10.10] ~ |" in rows["q8"]  # 2% wide, but [min, max] of 4 holds the median 87.5%
    # q4's own figures are unmarked; its speedup is marked, with no interval: the reference it divides rests
    # on one repetition
    cells = rows["q4"].strip("| ").split(" | ")
    assert cells[4].endswith("x ~") and not any("~" in c for c in cells[:4] + cells[5:])
    assert "Fewer than 6 repetitions cannot reach 95%" in text and "fewer than 5 repetitions" in text


def test_a_merge_short_of_shards_and_a_run_with_no_start_say_so_in_the_header():
    lines = environment_lines({"ended": "e", "missing_shards": ["2/4", "4/4"]})
    assert lines[0] == "- started ?, ended e; launcher ?"
    assert lines[-1] == "- missing shards: 2/4, 4/4: merged without them, their cells have no record"
    assert not any("missing shards" in line for line in environment_lines({"ended": "e", "missing_shards": []}))


def test_the_random_weight_caveat_names_every_such_model_once(tmp_path):
    from bench.report.markdown import random_weight_caveat

    records = [record("fp32", model=m) for m in ("a", "b", "a")] + [record("fp32", model="trained")]
    for r in records[:3]:
        r["metrics"]["drift_meaningful"] = False
    (text,) = random_weight_caveat(records)
    assert text.startswith("Drift of a, b is scored on random weights")


def test_the_caveat_reads_the_flag_where_cells_store_it(tmp_path):
    """The committed example's records as its cells wrote them, then as a synthetic model's would read."""
    records = example_records()
    assert {r["metrics"]["drift_meaningful"] for r in records} == {True} and "drift_meaningful" not in records[0]
    assert "random weights" not in render(write_run(tmp_path / "trained", records), "md")
    for r in records:
        r["metrics"]["drift_meaningful"] = False
    run = write_run(tmp_path / "random", records)
    caveat = ("Drift of builtin:pycode is scored on random weights: it checks the mechanics, not the variants' "
              "accuracy, yet the recommendations and Pareto fronts weigh it as they would a trained model's.")
    assert f"\n- {caveat}\n" in render(run, "md")
    html_caveat = caveat.replace("'", "&#x27;")
    assert f"<li>{html_caveat}</li>" in render(run, "html")


def test_a_recommendation_on_too_few_repetitions_says_the_tie_break_chose_and_lists_nothing_as_dominated(tmp_path):
    """The example's cells as they would read after 3 repetitions: bf16's median is the highest, yet fp32's
    lower drift wins the tie; neither report calls bf16 slower or dominated.
    """
    records = [first_repetitions(r, 3) for r in example_records() if r["variant"] in ("fp32", "no-kv-cache", "bf16")]
    run = write_run(tmp_path / "run", records)
    reason = ("decode tok/s 173.1 [168.8, 180.7] could not be told apart from no-kv-cache, bf16 (3 repetitions are "
              "too few for an interval, which needs 5); the choice rests on the tie-break: lower peak memory than "
              "no-kv-cache; lower KLD than bf16")
    md = render(run, "md")
    assert (f"\n- **recommended: fp32**: {reason} (`infermatrix select` with no constraints; add `--max-kld` etc. for "
            "yours)\n- Pareto front (decode tok/s against KLD): fp32, no-kv-cache, bf16\n\n## How to read this") in md
    assert "dominated" not in md and "best" not in md
    html = render(run, "html")
    assert f"<li><b>Recommended: fp32</b>: {reason}</li>" in html and "Dominated" not in html
    # Tied within noise on 5 repetitions and clearly more drift: dominated, in words that call it no slower.
    md = render(write_run(tmp_path / "five", [r for r in example_records() if r["variant"] in ("fp32", "bf16")]), "md")
    assert ("\n- dominated (another variant clearly better on decode tok/s or KLD and at least as good, within noise, "
            "on the other): bf16 (dominated by fp32)\n") in md
