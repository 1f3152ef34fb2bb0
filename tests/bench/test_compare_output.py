"""The gate's Markdown summary, line by line, for a comparison with known rows."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from bench.compare import Comparison, Row
from bench.compare_output import markdown_summary
from bench.gate_stats import GateConfig

CELL = "tiny fp32 cpu generate 1/16/8"


def _comparison(**kw) -> Comparison:
    rows = [
        Row(CELL, "tpot_ms", "TPOT ms", "ms", "lower", "speed", "regressed", n_base=10, n_head=10, blocks_base=2,
            blocks_head=2, base_median=3.0, head_median=3.6, ratio=1.2, low=1.12, high=1.29, p=1e-4, q=4e-4,
            threshold=0.05, cv=0.02, process_sd=0.012, process_df=6, mde=0.031),
        Row(CELL, "decode_tokens_per_s", "decode tok/s", "tok/s", "higher", "speed", "unchanged", n_base=10,
            n_head=10, blocks_base=2, blocks_head=1, base_median=333.3, head_median=334.0, ratio=1.002, low=0.99,
            high=1.01, p=0.8, q=0.8, threshold=0.05, cv=0.04, mde=math.inf, note="marked noisy in head"),
        Row(CELL, "peak_memory_bytes", "peak memory MiB", "bytes", "lower", "memory", "inconclusive", n_base=1,
            n_head=1, blocks_base=1, blocks_head=1, base_median=400 * 2**20, head_median=404 * 2**20, ratio=1.01,
            low=1.01, high=1.01, threshold=0.02),
        Row("tiny nf4 cpu generate 1/16/8", "status", "status", "", "", "status", "regressed",
            note="ok in base, failed in head: shape | mismatch\nat line 2"),
    ]
    return Comparison("runs/base", "runs/head", dataclasses.asdict(GateConfig()), [], False, rows=rows, **kw)


def test_names_from_the_runs_cannot_inject_markdown_into_the_comment():
    """Cell ids, notes, paths and environment differences come from run directories: data, not markup."""
    row = Row("![x](https://e.test/p.png) <img src=y> `q` | x", "status", "status", "", "", "status", "regressed",
              note="failed: [a](b) *c*")
    c = Comparison("runs/`base`", "runs/head", dataclasses.asdict(GateConfig()), ["torch: [a](https://e.test)"],
                   False, rows=[row], unmatched=["<b>bold</b> (only in head)"])
    text = markdown_summary(c)
    assert "](" not in text.replace("\\](", "") and "<img" not in text and "<b>" not in text
    assert "| ![x\\](https://e.test/p.png) &lt;img src=y&gt; \\`q\\` \\| x | status |" in text
    assert "failed: [a\\](b) \\*c\\*" in text and "- torch: [a\\](https://e.test)" in text
    assert "base `` runs/`base` `` → head `runs/head`: 1 regressed" in text
    (line,) = [line for line in text.splitlines() if line.startswith("| ![x")]
    assert len(re.split(r"(?<!\\)\|", line)) == 11  # nine columns: the name's pipe does not end its cell


def test_the_summary_states_the_outcome_method_and_changed_rows():
    c = _comparison(load={"base": 0.05, "head": None}, unmatched=["tiny bf16 cpu generate 1/16/8 (only in head)"])
    lines = markdown_summary(c).splitlines()
    assert lines[0] == "## infermatrix regression gate"
    assert lines[2] == ("base `runs/base` → head `runs/head`: 2 regressed, 0 improved, 1 unchanged, 1 inconclusive "
                        "of 4 comparisons. **Result: FAIL**")
    assert lines[4].startswith("Ratio of medians head/base with a 99% block-bootstrap interval; Mann-Whitney U "
                               "on the repetitions and a t test on the processes' levels (the larger p), "
                               "Benjamini-Hochberg q ≤ 0.01; threshold ±5% speed, ±2% memory. MDE: smallest change "
                               "detectable at 80% power")
    assert lines[6].startswith("1 speed comparisons have one process on a side")  # decode tok/s: 1 head process
    assert lines[8] == ("Machine load while measuring (median share of all CPUs used by other processes): "
                        "base 5.0%, head -.")
    table = [line for line in lines if line.startswith("| ")]
    assert table[1:4] == [
        f"| {CELL} | TPOT ms (↓) | 3 ms → 3.6 ms | +20.0% | [+12.0%, +29.0%] | 0.0004 | ❌ regressed | 3.1% (±5.0%) "
        "| n=10/10 in 2/2 processes |",
        f"| {CELL} | peak memory MiB (↓) | 400.0 MiB → 404.0 MiB | +1.0% | [+1.0%, +1.0%] | range | ❔ inconclusive "
        "| - (±2.0%) | n=1/1 in 1/1 processes |",
        "| tiny nf4 cpu generate 1/16/8 | status | | | | | ❌ regressed | | ok in base, failed in head: shape \\| "
        "mismatch at line 2 |",
    ]  # the unchanged decode row is left out; a pipe in an error cannot break the table
    assert "Cells in only one run (skipped): 1" in lines and "- tiny bf16 cpu generate 1/16/8 (only in head)" in lines
    noise = lines[lines.index("| metric | noise (CV) | between processes | MDE | comparisons |") + 2:]
    assert noise == ["| TPOT ms | 2.0% | 1.2% (6 df) | 3.1% | 1 |", "| decode tok/s | 4.0% | - | ∞ | 1 |",
                     "| peak memory MiB | - | - | - | 1 |"]


def test_show_all_lists_unchanged_rows_and_a_clean_run_says_so():
    c = _comparison()
    assert "| decode tok/s (↑) | 333.3 tok/s → 334 tok/s | +0.2% | [-1.0%, +1.0%] | 0.8 | unchanged | ∞ (±5.0%) " \
           "| n=10/10 in 2/1 processes; marked noisy in head |" in markdown_summary(c, show_all=True)
    assert "Machine load" not in markdown_summary(c)
    clean = Comparison("a", "b", dataclasses.asdict(GateConfig()), [], False, rows=[c.rows[1]])
    text = markdown_summary(clean)
    assert "**Result: pass**" in text and "| cell |" not in text
    assert "Every comparison is unchanged." in text.splitlines()


def test_differing_environments_come_first_and_say_whether_verdicts_were_called():
    c = _comparison()
    c.env_diffs = ["cpu_model: 'A' in base, 'B' in head"]
    lines = markdown_summary(c).splitlines()
    assert lines[2] == ("**Environments differ: no regression or improvement is called** (use --allow-env-mismatch "
                        "to override):")
    assert lines[4] == "- cpu_model: 'A' in base, 'B' in head"
    c.env_mismatch_allowed = True
    assert markdown_summary(c).splitlines()[2] == "Environments differ (compared anyway: --allow-env-mismatch):"


FULL = """## infermatrix regression gate

**Environments differ: no regression or improvement is called** (use --allow-env-mismatch to override):

- cpu_model: 'A' in base, 'B' in head

base `runs/base` → head `runs/head`: 2 regressed, 0 improved, 1 unchanged, 1 inconclusive of 4 comparisons. \
**Result: FAIL**

Ratio of medians head/base with a 99% block-bootstrap interval; Mann-Whitney U on the repetitions and a t test \
on the processes' levels (the larger p), Benjamini-Hochberg q ≤ 0.01; threshold ±5% speed, ±2% memory. MDE: \
smallest change detectable at 80% power with the observed noise (a threshold below it reports noise, so such \
changes stay inconclusive).

2 speed comparisons have one process on a side: noise between processes (a neighbour's burst of load) is not seen \
in their intervals, so they give no verdict unless --min-processes 1; `[measure] rounds >= 2` or `infermatrix ab` \
measure it.

Machine load while measuring (median share of all CPUs used by other processes): base 5.0%, head -.

Base and head were measured on different hosts (base: ci-7, ci-8; head: ci-2, ci_9): a difference between the machines \
moves every cell alike, and no test here can tell it from a change of the code; `infermatrix ab` measures both \
revisions in one job.

The machine's own ceilings, measured at each run's start, differ beyond ±5%: cpu copy bandwidth 42.1 → 35 GB/s \
(-16.9%); c\\*da bfloat16 matmul 700 → 800 TFLOP/s (+14.3%). A change of that size in every cell is the machine's, \
not the code's.

| cell | metric | base → head | change | interval | q | verdict | MDE (threshold) | samples |
|---|---|---|---|---|---|---|---|---|
| tiny fp32 cpu generate 1/16/8 | TPOT ms (↓) | 3 ms → 3.6 ms | +20.0% | [+12.0%, +29.0%] | 0.0004 | ❌ regressed \
| 3.1% (±5.0%) | n=10/10 in 1/2 processes |
| tiny fp32 cpu generate 1/16/8 | peak memory MiB (↓) | 400.0 MiB → 404.0 MiB | +1.0% | [+1.0%, +1.0%] | range \
| ❔ inconclusive | - (±2.0%) | n=1/1 in 1/1 processes |
| tiny nf4 cpu generate 1/16/8 | status | | | | | ❌ regressed | | ok in base, failed in head: shape \\| mismatch \
at line 2 |

Cells in only one run (skipped): 1

- tiny bf16 cpu generate 1/16/8 (only in head)

Observed noise per metric (median robust CV over cells, both sides; sd of a whole process's level beyond its \
repetitions, pooled over cells, with its degrees of freedom: the fewer, the larger a change must be to be called) and \
median MDE:

| metric | noise (CV) | between processes | MDE | comparisons |
|---|---|---|---|---|
| TPOT ms | 2.0% | 1.2% (6 df) | 3.1% | 1 |
| decode tok/s | 4.0% | - | ∞ | 1 |
| peak memory MiB | - | - | - | 1 |
"""


def test_the_whole_summary_with_every_section():
    import warnings

    c = _comparison(load={"base": 0.05, "head": None}, unmatched=["tiny bf16 cpu generate 1/16/8 (only in head)"],
                    hosts={"base": ["ci-7", "ci-8"], "head": ["ci-2", "ci_9"]})
    c.env_diffs = ["cpu_model: 'A' in base, 'B' in head"]
    c.ceilings = [{"device": "cpu", "figure": "copy bandwidth", "unit": "GB/s", "base": 42.1, "head": 35.0,
                   "ratio": 35.0 / 42.1},
                  {"device": "cpu", "figure": "float32 matmul", "unit": "TFLOP/s", "base": 0.2, "head": 0.21,
                   "ratio": 1.05},  # on the band's edge: not beyond it
                  {"device": "c*da", "figure": "bfloat16 matmul", "unit": "TFLOP/s", "base": 700, "head": 800,
                   "ratio": 8 / 7}]
    c.rows[0].blocks_base = 1  # TPOT from one base process, decode tok/s from one head process: 2 such comparisons
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a median of no figures would warn: the noise table must not take one
        assert markdown_summary(c) == FULL
    c.config["min_processes"] = 1  # asked for: said so, not asked for again
    assert "so they give verdicts (--min-processes 1); `[measure] rounds" in markdown_summary(c)
    assert "unless --min-processes 1" not in markdown_summary(c)


@pytest.mark.parametrize(("hosts", "said"), [
    ({"base": ["a"], "head": ["b"]}, True),
    ({"base": ["a", "b"], "head": ["b"]}, False),  # one host measured both: its own shifts are in the tests
    ({"base": [], "head": ["b"]}, False),  # records that name no host say nothing either way
    ({}, False),
])
def test_separate_hosts_are_said_only_when_no_host_measured_both_sides(hosts, said):
    text = markdown_summary(_comparison(hosts=hosts))
    assert ("measured on different hosts" in text) == said


def test_a_row_without_figures_prints_dashes():
    row = Row(CELL, "ttft_ms", "TTFT ms", "ms", "lower", "speed", "inconclusive", threshold=0.05)
    c = Comparison("a", "b", dataclasses.asdict(GateConfig()), [], False, rows=[row])
    line = (f"| {CELL} | TTFT ms (↓) | - → - | - | [-, -] | range | ❔ inconclusive | - (±5.0%) "
            "| n=0/0 in 0/0 processes |")
    assert line in markdown_summary(c).splitlines()


@pytest.mark.parametrize(("unmatched", "heading"), [
    (["a (only in base)"], "Cells in only one run (skipped): 1"),
    (["a (only in base)", "b (only in head)"], "Cells in only one run (skipped): 2"),
    (["a (only in base)", "c (in both matrices, recorded in neither run)"],
     "Cells not recorded in both runs (skipped): 2"),
])
def test_the_unmatched_heading_says_whether_a_cell_ran_at_all(unmatched, heading):
    lines = markdown_summary(_comparison(unmatched=unmatched)).splitlines()
    at = lines.index(heading)
    assert lines[at + 2:at + 2 + len(unmatched)] == [f"- {u}" for u in unmatched]


def test_the_noise_table_lists_the_process_noise_of_each_device_once():
    rows = [Row(f"tiny fp32 {dev} generate 1/16/8 {i}", "tpot_ms", "TPOT ms", "ms", "lower", "speed", "unchanged",
                cv=0.02, process_sd=sd, process_df=df, mde=0.1)
            for i, (dev, sd, df) in enumerate([("cpu", 0.02, 8), ("cuda", 0.1, 2), ("cpu", 0.02, 8)])]
    c = Comparison("a", "b", dataclasses.asdict(GateConfig()), [], False, rows=rows)
    assert "| TPOT ms | 2.0% | 2.0% (8 df) / 10.0% (2 df) | 10.0% | 3 |" in markdown_summary(c).splitlines()


@pytest.mark.parametrize(("df", "said"), [(2, True), (3, True), (4, False), (None, False)])
def test_a_process_noise_estimate_from_few_degrees_of_freedom_is_said(df, said):
    rows = [Row(CELL, "tpot_ms", "TPOT ms", "ms", "lower", "speed", "inconclusive", cv=0.02,
                process_sd=None if df is None else 0.03, process_df=df, mde=0.2)]
    text = markdown_summary(Comparison("a", "b", dataclasses.asdict(GateConfig()), [], False, rows=rows))
    line = (f"The noise between processes is estimated from {df} degrees of freedom: the t test on process levels "
            "then calls only large changes. More processes (`[measure] rounds`, `ab --rounds 3`) or more cells in "
            "the matrix sharpen it.")
    lines = text.splitlines()
    assert (line in lines) == said and lines[0] == "## infermatrix regression gate"
    if said:
        at = lines.index(line)
        assert lines[at - 1] == lines[at + 1] == "" and lines[at - 2].startswith("Ratio of medians")
