"""The harness's own overhead on a 10,000-cell run: loading, statistics, compare, rendering."""

from __future__ import annotations

import numpy as np

from bench import gate_stats as gs
from bench.compare import compare_sides, load_side
from bench.compare_output import markdown_summary
from bench.results import read_records
from bench.stats import summarize

from .conftest import CELLS


def test_load_records(benchmark, big_runs):
    records = benchmark(read_records, big_runs[0], False)
    assert len(records) == CELLS


def test_load_and_group_for_compare(benchmark, big_runs):
    side = benchmark(load_side, big_runs[0])
    assert len(side.ok) == CELLS


def test_summarize_every_cell(benchmark, big_runs):
    records = read_records(big_runs[0])
    out = benchmark(lambda: [summarize(r["samples"]["tpot_ms"]) for r in records])
    assert len(out) == CELLS and out[0]["n"] == 5


def test_one_comparison_statistics(benchmark):
    rng = np.random.default_rng(0)
    base = [list(np.exp(rng.normal(0, 0.05, 5))) for _ in range(2)]
    head = [list(1.1 * np.exp(rng.normal(0, 0.05, 5))) for _ in range(2)]
    cfg = gs.GateConfig()
    ratio, low, high = benchmark(gs.ratio_interval, base, head, cfg.level, cfg.n_resamples, cfg.seed)
    assert low <= ratio <= high


def test_bh_over_all_comparisons(benchmark):
    p = np.random.default_rng(0).uniform(size=CELLS * 5)
    assert len(benchmark(gs.bh_adjust, p)) == CELLS * 5


def test_compare_10000_cells(benchmark, big_runs):
    # Bootstrap resamples cut to 200 so one round fits in minutes; the per-comparison figure above is at defaults.
    base, head = load_side(big_runs[0]), load_side(big_runs[1])
    cfg = gs.GateConfig(n_resamples=200)
    c = benchmark.pedantic(compare_sides, (base, head, cfg), rounds=1, iterations=1)
    assert len(c.rows) == CELLS * 5
    assert {r.cell.split()[1] for r in c.regressed} <= {f"v{i}" for i in range(0, CELLS, 100)}


def test_render_markdown_summary(benchmark, big_runs):
    base, head = load_side(big_runs[0]), load_side(big_runs[1])
    keys = sorted(base.ok)[:1000]
    c = compare_sides(type(base)(base.run_dir, base.run, {k: base.ok[k] for k in keys}, {}),
                      type(head)(head.run_dir, head.run, {k: head.ok[k] for k in keys}, {}),
                      gs.GateConfig(n_resamples=200))
    text = benchmark(markdown_summary, c, True)
    assert text.count("\n| synthetic:llama-tiny") == len(c.rows)
