"""The typed cell: made by expand, across the process boundary by to_dict/from_dict, one identity."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

import bench.matrix as matrix_module
from bench.cells import Cell, MeasureConfig, identity
from bench.commands import run as run_command
from bench.compare import cell_key
from bench.matrix import expand, load_matrix, narrow, parse_matrix
from bench.metrics.drift_config import DriftBudget, DriftConfig
from bench.results import new_record
from bench.scenarios import SCENARIOS, DecodeScenario, GenerateScenario, PrefillScenario, scenario_from_dict
from optimize.errors import InputError
from optimize.recipe import Recipe

SWEEPS = {"models": ["builtin:pycode", "synthetic:llama-tiny"], "variants": ["fp32", "bf16", "prune-2of4"],
          "scenarios": [{"name": "generate", "batch_size": [1, 4]}, {"name": "prefill", "prompt_tokens": [32, 64]},
                        {"name": "decode", "batch_size": [1, 2], "memory_percent": 50}]}
# cell_ids of the first cells of SWEEPS and of the default matrix as the dict-based expansion
# wrote them: records, resume and shards key on these, so the typed cell must hash the same.
PINNED_IDS = {0: "e9ba07c2bc90a079", 1: "724e88c0c2b7e732", 2: "e0437afeb646df40", 3: "cc7843b2efc4259f"}


def cpu(_: str) -> str:
    return "cpu"


def test_cell_ids_are_unchanged_from_the_dict_cells():
    cells = expand(parse_matrix(SWEEPS, "x.toml"), cpu)
    assert {i: cells[i].cell_id for i in PINNED_IDS} == PINNED_IDS
    assert len({c.cell_id for c in cells}) == len(cells) == 2 * 3 * (2 + 2 + 2)


def test_every_cell_crosses_to_dict_and_back_unchanged():
    data = {**SWEEPS, "drift": {"max_tokens": 1024, "budget": {"max_kld_mean": 0.5}}, "measure": {"threads": 1}}
    for cell in expand(parse_matrix(data, "x.toml"), cpu):
        cell = dataclasses.replace(cell, cache_dir="/tmp/c", ceilings={"memory": {"bandwidth_gbps": 9.0}}, round=2)
        job = json.loads(json.dumps(cell.to_dict()))  # what the cell's process reads
        back = Cell.from_dict(job)
        # A recipe's description is not part of its dict (nor of the cell's identity); all else is equal.
        assert dataclasses.replace(back, recipe=cell.recipe) == cell and back.to_dict() == cell.to_dict()
        assert back.cell_id == cell.cell_id == job["cell_id"]
        assert type(back.scenario) is type(cell.scenario) and isinstance(back.drift, DriftConfig)
        assert back.drift_budget == DriftBudget(max_kld_mean=0.5) and back.measure.threads == 1


def test_a_job_file_whose_contents_do_not_match_its_cell_id_is_refused():
    cell = Cell(model="m", recipe=Recipe(name="fp32"), device="cpu", scenario=GenerateScenario(batch_size=2))
    job = cell.to_dict()
    job["scenario"]["batch_size"] = 3
    with pytest.raises(ValueError, match=f"cell {cell.cell_id}: its contents hash to"):
        Cell.from_dict(job)


def test_measure_config_round_trips_through_its_dict():
    m = MeasureConfig(timeout_s=12.5, seed=3, roofline=False, rounds=4, threads=2)
    m = dataclasses.replace(m, repeat=dataclasses.replace(m.repeat, warmup=0, min_reps=2, target_rel_ci=0.1))
    assert MeasureConfig.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_identity_is_one_function_for_cells_and_records():
    for cell in expand(parse_matrix(SWEEPS, "x.toml"), cpu):
        assert cell_key(new_record(cell)) == cell.key
    prefill = Cell(model="m", recipe=Recipe(name="bf16"), device="cpu", scenario=PrefillScenario(2, 64))
    decode = Cell(model="m", recipe=Recipe(name="bf16"), device="cuda", scenario=DecodeScenario(4, 16, 8, 50))
    # Hand-written: the grid in batch/prompt/new order, other settings after it.
    assert prefill.key == "m bf16 cpu prefill 2/64/1"
    assert decode.key == "m bf16 cuda decode 4/16/8 memory_percent=50"
    assert identity("m", "bf16", "cuda", decode.scenario.to_dict()) == decode.key


def test_prefill_generates_one_token_by_its_own_definition():
    s = PrefillScenario(batch_size=2, prompt_tokens=8)
    assert s.new_tokens == 1 and s.to_dict() == {"name": "prefill", "batch_size": 2, "prompt_tokens": 8,
                                                 "new_tokens": 1}
    assert scenario_from_dict(s.to_dict()) == s
    with pytest.raises(InputError, match="'new_tokens' is not a prefill setting"):
        parse_matrix({"scenarios": [{"name": "prefill", "new_tokens": 4}]}, "x.toml")


def test_each_scenario_kind_owns_its_run():
    for name, kind in SCENARIOS.items():
        assert kind.name == name
        assert "run" in vars(kind), f"{name} has no run() of its own"
    with pytest.raises(TypeError, match="needs the variant's footprint"):
        DecodeScenario().run(state=None, prompts=None, repeat_cfg=None)


def test_a_cli_batch_size_is_validated_once_and_the_matrix_is_not_parsed_again(monkeypatch):
    """--batch-size -> narrow (the one check) -> expand -> job file -> the cell's process: no re-parse."""
    checked: list[int] = []
    original = GenerateScenario.validate

    def counting(self):
        checked.append(self.batch_size)
        original(self)

    monkeypatch.setattr(GenerateScenario, "validate", counting)
    base = load_matrix()  # the file's own grid is checked when the file is read
    checked.clear()

    def no_reparse(*args, **kwargs):
        raise AssertionError("the matrix was parsed again")

    monkeypatch.setattr(matrix_module, "parse_matrix", no_reparse)
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    args = parser.parse_args(["--batch-size", "3,5", "--variants", "fp32"])
    assert checked == []  # the command line only reads integers
    narrowed = narrow(base, batch_size=args.batch_size, variants=args.variants)
    assert sorted(checked) == [3, 5]
    cells = expand(narrowed, cpu)
    back = [Cell.from_dict(json.loads(json.dumps(c.to_dict()))) for c in cells]
    assert sorted(checked) == [3, 5]  # expanding and crossing into the cell's process check nothing again
    assert sorted(c.scenario.batch_size for c in back) == [3, 5]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--new-tokens", "1"], "new_tokens must be >= 2 so decode can be timed, got 1"),
    (["--variants", "fp3"], "names unknown variant 'fp3'"),
])
def test_narrowing_checks_what_the_flags_replace_with_the_files_rules(flags, message):
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    args = parser.parse_args(flags)
    with pytest.raises(InputError, match=message) as exc:
        narrow(load_matrix(), batch_size=args.batch_size, new_tokens=args.new_tokens, variants=args.variants)
    assert "command-line flags" in str(exc.value)
