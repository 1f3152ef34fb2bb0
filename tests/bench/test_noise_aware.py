"""Noise-aware measurement: CI-targeted repetition, noisy marking, rounds, machine load."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from bench.cells import Cell
from bench.cli import main as cli
from bench.matrix import MeasureConfig, parse_matrix
from bench.metrics.load import machine_load, noise_mark
from bench.metrics.timing import GenerateSample, RepeatConfig, rel_ci_half_width, repeat
from bench.orchestrate import _rounds
from bench.scenarios import GenerateScenario
from optimize.errors import InputError
from optimize.recipe import Recipe


def _sampler(values):
    it = iter(values)
    return lambda: GenerateSample(token_ms=[1.0], e2e_ms=next(it))


def test_repetition_stops_once_the_median_ci_is_tight():
    cfg = RepeatConfig(warmup=0, min_reps=5, max_reps=12, budget_s=1e9, target_rel_ci=0.05)
    steady = repeat(_sampler([100.0] * 12), cfg)
    assert len(steady.samples) == 5  # CI of the median is [100, 100] at once
    noisy = repeat(_sampler([100.0, 200.0] * 6), cfg)
    assert len(noisy.samples) == 12  # never tight: runs to max_reps (the budget never ran out here)
    off = repeat(_sampler([100.0] * 12), RepeatConfig(warmup=0, min_reps=5, max_reps=12, budget_s=1e9,
                                                      target_rel_ci=0.0))
    assert len(off.samples) == 12  # target 0: the budget alone decides, as before


def test_noisy_mark_states_the_width_reached():
    mark = noise_mark({"e2e_ms": [100.0, 200.0, 100.0, 200.0, 150.0]}, 0.05)
    assert mark["noisy"] is True and mark["noise"]["rel_ci_half_width"] == pytest.approx(0.5 * 100 / 150)
    assert noise_mark({"e2e_ms": [100.0, 101.0, 100.5, 100.2, 100.1]}, 0.05)["noisy"] is False
    assert rel_ci_half_width([1.0, 1.0, 1.0]) == 0.0


def test_machine_load_records_other_processes_cpu():
    with machine_load() as load:
        sum(i * i for i in range(200_000))
    assert load["wall_s"] > 0 and load["cpu_count"] >= 1
    assert load["other_cpu_s"] >= 0 and 0 <= load["other_cpu_fraction"]


def test_rounds_parse_and_validate():
    m = parse_matrix({"measure": {"rounds": 3, "target_rel_ci": 0.02}}, "m.toml")
    assert m.measure.rounds == 3 and m.measure.repeat.target_rel_ci == 0.02
    assert MeasureConfig().rounds == 1 and m.measure.to_dict()["rounds"] == 3
    with pytest.raises(InputError, match="'rounds' must be a whole number >= 1"):
        parse_matrix({"measure": {"rounds": 0}}, "m.toml")
    with pytest.raises(InputError, match="target_rel_ci"):
        parse_matrix({"measure": {"target_rel_ci": 1.5}}, "m.toml")


def test_each_round_runs_every_cell_once_in_its_own_order():
    cells = [Cell(model="m", recipe=Recipe(name="fp32"), device="cpu", scenario=GenerateScenario(batch_size=i + 1))
             for i in range(8)]
    ids = {c.cell_id: f"c{i}" for i, c in enumerate(cells)}
    jobs = _rounds(cells, Counter({cells[0].cell_id: 1}), MeasureConfig(rounds=3, seed=4))
    assert Counter(ids[j.cell_id] for j in jobs) == {**{f"c{i}": 3 for i in range(1, 8)}, "c0": 2}  # resume: c0 has 1
    orders = [[j.cell_id for j in jobs if j.round == r] for r in range(3)]
    assert len({tuple(o) for o in orders[1:]}) == 2 and sorted(orders[2]) == sorted(orders[1])
    assert _rounds(cells, Counter(), MeasureConfig()) == cells  # one round: stable order, unchanged


@pytest.mark.slow
def test_run_with_rounds_pools_processes_and_records_load(tmp_path, cache_dir, capsys):
    from bench.results import read_records, validate_record

    matrix = tmp_path / "m.toml"
    matrix.write_text('models = ["synthetic:llama-tiny"]\nvariants = ["fp32", "no-kv-cache"]\ndevices = ["cpu"]\n'
                      '[[scenarios]]\nbatch_size = [1]\nprompt_tokens = [16]\nnew_tokens = [8]\n'
                      '[measure]\nwarmup = 1\nmin_reps = 3\nmax_reps = 6\nbudget_s = 0.2\nrounds = 2\n'
                      'roofline = false\n[drift]\nenabled = false\n')
    run = tmp_path / "run"
    assert cli(["run", str(matrix), "--out", str(run), "--quiet"]) == 0
    records = read_records(run, latest_only=False)
    assert Counter(r["variant"] for r in records) == {"fp32": 2, "no-kv-cache": 2}
    assert sorted(r["round"] for r in records) == [0, 0, 1, 1]
    for r in records:
        validate_record(r)
        assert isinstance(r["noisy"], bool) and r["noise"]["target_rel_ci"] == 0.05
        assert r["load"]["wall_s"] > 0 and "loadavg_1m_start" in r["load"]
    with (run / "results.csv").open() as f:  # the run's own report: one row per cell, its rounds pooled
        rows = list(csv.DictReader(f))
    assert [r["rounds_ok"] for r in rows] == ["2", "2"] and all(int(r["tpot_ms_n"]) >= 6 for r in rows)
    assert "(p50 over the repetitions of every ok round)" in capsys.readouterr().out  # the end-of-run table
    assert cli(["compare", str(run), str(run), "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    tpot = [r for r in rows if r["metric"] == "tpot_ms"]
    assert len(tpot) == 2 and all(r["blocks_base"] == 2 and r["n_base"] >= 6 and r["ratio"] == 1.0 for r in tpot)
    assert {r["verdict"] for r in rows} <= {"unchanged", "inconclusive"}  # a run against itself
