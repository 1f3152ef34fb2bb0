"""Details of the Markdown and CSV reports: escaping, partial environments, the flat CSV row."""

from __future__ import annotations

import csv
import io

from bench.report.csv import csv_report
from bench.report.markdown import environment_lines, md_escape
from tests.bench.records import record


def test_markdown_cells_escape_backslashes_pipes_and_html_and_stay_on_one_line():
    assert md_escape("a\\|b <script>\n  c") == "a\\\\\\|b &lt;script&gt; c"
    assert md_escape(3.5) == "3.5"


def test_environment_lines_of_a_run_recorded_without_an_environment():
    lines = environment_lines({"started": "s", "ended": "e", "launcher": "local"})
    assert lines[0] == "- started s, ended e; launcher local"
    assert lines[1] == "- CPU None (None logical cores), RAM 0.0 GiB, GPUs: none"
    assert lines[2:] == ["- ", "- git ?"]
    with_libs = environment_lines({"environment": {"libraries": {"torch": "2.13.0"}, "git": {"commit": "ab" * 20,
                                                                                           "dirty": True}}})
    assert with_libs[2] == "- torch 2.13.0" and with_libs[3] == f"- git {'ab' * 6} (dirty)"
    shard = environment_lines({"started": "s", "ended": "e", "launcher": "ray", "shard": "2/4"})
    assert shard[0] == "- started s, ended e; launcher ray, shard 2/4"


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
