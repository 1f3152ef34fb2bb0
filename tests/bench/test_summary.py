"""The end-of-run summary: a line for each variant whose drift makes ``run`` exit 1."""

from __future__ import annotations

import json
import shutil

from bench.cli import main
from bench.metrics.drift_config import DriftBudget
from bench.summary import drift_lines
from tests.bench.example_records import EXAMPLE, example_records, under_drift_budget, with_drift_failed

BUDGET = DriftBudget(max_kld_mean=0.01)


def _finished_run(tmp_path, records):
    """The committed example run with ``records`` and the budget they were checked under in its matrix."""
    run = tmp_path / "run"
    shutil.copytree(EXAMPLE, run)
    meta = json.loads((run / "run.json").read_text())
    meta["matrix"]["drift"]["budget"] = {"max_kld_mean": BUDGET.max_kld_mean}
    (run / "run.json").write_text(json.dumps(meta))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_a_run_over_its_drift_budget_says_which_variant_which_metric_and_which_limit(tmp_path, capsys):
    """The user's path: ``run --resume`` of a finished run prints the summary and exits as the run did."""
    run = _finished_run(tmp_path, [under_drift_budget(r, BUDGET) for r in example_records()])
    assert main(["run", "--resume", str(run), "--no-report"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = lines.index(f"results: {run / 'results.jsonl'}")
    assert lines[at - 3:at] == [
        "torch-int8-dynamic over its drift budget: kld_mean 0.0176904 > max_kld_mean 0.01",
        "prune-50 over its drift budget: kld_mean 0.0977235 > max_kld_mean 0.01",
        "prune-ffn-25 over its drift budget: kld_mean 0.27305 > max_kld_mean 0.01"]
    assert out.count("over its drift budget") == 3 and "drift failed" not in out


def test_a_run_within_its_budget_prints_no_drift_line(tmp_path, capsys):
    run = _finished_run(tmp_path, [under_drift_budget(r, DriftBudget(max_kld_mean=0.5)) for r in example_records()])
    assert main(["run", "--resume", str(run), "--no-report"]) == 0
    assert "drift" not in capsys.readouterr().out.split("┘")[-1]  # below the table: nothing about drift


def test_a_drift_measurement_that_failed_names_its_cause(tmp_path, capsys):
    try:
        raise RuntimeError("reference logits hold NaN")
    except RuntimeError as exc:
        failed = with_drift_failed(example_records()[2], exc)
    records = [failed if r["variant"] == "bf16" else r for r in example_records()]
    run = _finished_run(tmp_path, records)
    assert main(["run", "--resume", str(run), "--no-report"]) == 1
    out = capsys.readouterr().out
    assert "\nbf16 drift failed: RuntimeError: reference logits hold NaN\nresults: " in out


def test_a_variant_is_named_once_for_all_its_cells_and_qualified_where_the_run_has_several_models():
    fp32, int8 = (under_drift_budget(r, BUDGET) for r in example_records()[::3][:2])
    assert int8["variant"] == "torch-int8-dynamic"
    other_cell = {**int8, "scenario": {**int8["scenario"], "batch_size": 2}}  # drift is shared by a variant's cells
    assert drift_lines([fp32, int8, other_cell]) == [
        "torch-int8-dynamic over its drift budget: kld_mean 0.0176904 > max_kld_mean 0.01"]
    other_model = {**int8, "model": "synthetic:llama-tiny"}
    assert drift_lines([int8, other_model]) == [
        "torch-int8-dynamic (builtin:pycode, cpu) over its drift budget: kld_mean 0.0176904 > max_kld_mean 0.01",
        "torch-int8-dynamic (synthetic:llama-tiny, cpu) over its drift budget: kld_mean 0.0176904 > max_kld_mean "
        "0.01"]


def test_a_run_whose_every_cell_skipped_says_nothing_was_measured(tmp_path, capsys):
    from bench.commands.run import _exit_code
    from bench.summary import print_summary

    records = [{**r, "status": "skipped", "error": f"{r['variant']} needs a library this machine lacks"}
               for r in example_records()[:2]]
    print_summary(records, tmp_path)
    assert _exit_code(records) == 0
    out = capsys.readouterr().out
    assert "fp32 (skipped): fp32 needs a library this machine lacks" in out
    assert ("nothing was measured: all 2 cells skipped, each with its reason above (a skip is what this machine "
            "cannot run, not a failure: exit 0)") in out


def test_a_run_with_no_cells_prints_no_table_and_no_results_file(tmp_path, capsys):
    from bench.summary import print_summary

    print_summary([], tmp_path)
    assert capsys.readouterr().out == f"no cells: nothing was measured in {tmp_path}\n"
