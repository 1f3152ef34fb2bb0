"""The cells of a run's matrix that have no record: named by report and select, from run.json alone."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.cli import main
from bench.matrix import expand, parse_matrix
from bench.orchestrate import Shard, start_run, unrecorded_cells
from bench.results import RUN, read_records, read_run, write_json_atomic
from tests.bench.records import record, write_run

MATRIX = {"name": "grid", "models": ["builtin:pycode"], "devices": ["auto"],
          "variants": ["fp32", "bf16", "bnb-int8", "prune-50"],
          "scenarios": [{"name": "generate", "batch_size": [1, 2], "prompt_tokens": [16], "new_tokens": [4]}]}
CPU_HOST = {"torch": {"cuda_available": False, "version": "2.13.0+cpu"}}
SHOWN = 10


def _started(tmp_path, data=MATRIX, environment=CPU_HOST, shard=None):
    """A run directory as `infermatrix run` starts it, and its cells as this host would expand them."""
    matrix = parse_matrix(data, str(tmp_path / "grid.toml"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=shard, launcher="local", environment=environment)
    cells = expand(matrix, lambda d: "cpu" if d == "auto" else d)
    return run_dir, shard.select(cells) if shard else cells


def _record(run_dir, cell, status="ok"):
    """A record of ``cell`` appended as the runner appends one."""
    from bench.results import append_record

    rec = record(cell.recipe.name, status=status, model=cell.model, device=cell.device,
                 scenario=cell.scenario.to_dict())
    rec["cell_id"] = cell.cell_id
    append_record(run_dir, rec)


def test_the_cells_without_a_record_are_the_matrix_cells_no_record_names(tmp_path):
    run_dir, cells = _started(tmp_path)
    assert len(cells) == 8
    for cell in cells[:3]:
        _record(run_dir, cell)
    _record(run_dir, cells[5], status="failed")  # a failed cell has its record: it ran
    missing = unrecorded_cells(read_run(run_dir), read_records(run_dir))
    assert [c.cell_id for c in missing] == [c.cell_id for c in cells[3:5] + cells[6:]]
    assert all(c.device == "cpu" for c in missing)  # `auto` resolved as the run's own torch probe did
    for cell in cells:
        _record(run_dir, cell)
    assert unrecorded_cells(read_run(run_dir), read_records(run_dir)) == []


def test_auto_resolves_to_the_device_the_run_saw_not_the_reporting_hosts(tmp_path):
    run_dir, _ = _started(tmp_path, environment={"torch": {"cuda_available": True, "version": "2.11.0+cu130"}})
    missing = unrecorded_cells(read_run(run_dir), [])
    assert len(missing) == 8 and {c.device for c in missing} == {"cuda"}


def test_a_shard_run_counts_only_its_own_cells(tmp_path):
    shard = Shard.parse("2/3")
    run_dir, cells = _started(tmp_path, shard=shard)
    assert len(cells) == 3
    _record(run_dir, cells[0])
    assert [c.cell_id for c in unrecorded_cells(read_run(run_dir), read_records(run_dir))] == \
        [c.cell_id for c in cells[1:]]


@pytest.mark.parametrize("spoil", ["hand-made", "edited matrix", "auto without a probe", "no matrix"])
def test_a_run_description_that_cannot_say_gives_no_answer_rather_than_a_wrong_one(tmp_path, spoil):
    run_dir, _ = _started(tmp_path)
    run = read_run(run_dir)
    if spoil == "hand-made":
        run = json.loads(((write_run(tmp_path / "made", [record("fp32")])) / RUN).read_text())
    elif spoil == "edited matrix":  # its hash no longer says which cells it had
        run["matrix"]["variants"] = ["fp32"]
    elif spoil == "auto without a probe":
        del run["environment"]["torch"]
    else:
        del run["matrix"]
    assert unrecorded_cells(run, []) is None


def test_a_fixed_device_needs_no_probe_and_host_paths_are_not_checked(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("def f():\n    return 1\n")
    model = tmp_path / "model"  # a local model directory, as check_model_spec wants one
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"")
    data = {**MATRIX, "devices": ["cpu"], "eval_text": str(text), "prompt_source": "eval-text",
            "models": [str(model), "synthetic:llama-tiny"]}
    run_dir, cells = _started(tmp_path, data=data, environment={})
    assert {c.model for c in cells} == {str(model), "synthetic:llama-tiny"}
    # The report's host need not have the evaluation text the run read, nor its model directory.
    text.unlink()
    shutil.rmtree(model)
    assert [c.cell_id for c in unrecorded_cells(read_run(run_dir), [])] == [c.cell_id for c in cells]


def test_a_description_without_the_optional_keys_still_answers(tmp_path):
    """run.json as a version before these keys wrote it: each takes its default, as the run took it."""
    run_dir, cells = _started(tmp_path)
    run = read_run(run_dir)
    for key in ("source", "eval_text", "tokenizer", "prompt_source", "models"):  # models: builtin:pycode
        del run["matrix"][key]
    assert [c.cell_id for c in unrecorded_cells(run, [])] == [c.cell_id for c in cells]


def test_the_reports_name_the_cells_without_a_record(tmp_path):
    variants = ["fp32", "bf16", "bnb-int8", "prune-50", "prune-ffn-25", "torch-int8-dynamic", "no-kv-cache"]
    run_dir, cells = _started(tmp_path, data={**MATRIX, "variants": variants})
    assert len(cells) == 14
    _record(run_dir, cells[0])
    assert main(["report", str(run_dir), "--format", "md,json"]) == 0
    md = (run_dir / "report.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("- not recorded: ")]
    keys = [c.key for c in cells[1:]]
    assert line == (f"- not recorded: 13 of 14 cells have no record: {'; '.join(keys[:SHOWN])}; and 3 more "
                    "('infermatrix run --resume' on the run directory runs them)")
    assert json.loads((run_dir / "report.json").read_text())["unrecorded_cells"] == keys
    for cell in cells[1:4]:  # ten left: every one named, no "more"
        _record(run_dir, cell)
    assert main(["report", str(run_dir), "--format", "md,json"]) == 0
    (line,) = [x for x in (run_dir / "report.md").read_text().splitlines() if x.startswith("- not recorded: ")]
    assert line == (f"- not recorded: 10 of 14 cells have no record: {'; '.join(keys[3:])} "
                    "('infermatrix run --resume' on the run directory runs them)")
    for cell in cells[4:]:
        _record(run_dir, cell)
    assert main(["report", str(run_dir), "--format", "md,json"]) == 0
    assert "not recorded" not in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "report.json").read_text())["unrecorded_cells"] == []


def test_the_html_page_gives_the_same_fact(tmp_path):
    from bench.report.html import html_text
    from bench.report.markdown import unrecorded_text

    run_dir, cells = _started(tmp_path)
    _record(run_dir, cells[0])
    run, records = read_run(run_dir), read_records(run_dir)
    text = unrecorded_text(run, records)
    assert text.startswith("7 of 8 cells have no record: ")
    assert f"<dt>not recorded</dt><dd>{text.replace(chr(39), '&#x27;')}</dd>" in html_text(run, records)


def test_a_merge_without_a_shard_names_that_shards_cells_and_suggests_no_resume(tmp_path):
    run_dir, cells = _started(tmp_path)
    for cell in Shard.parse("1/2").select(cells):
        _record(run_dir, cell)
    meta = read_run(run_dir)
    write_json_atomic(run_dir / RUN, {**meta, "ended": "2026-01-01T00:01:00Z", "missing_shards": ["2/2"]})
    assert main(["report", str(run_dir), "--format", "md,json"]) == 0
    (line,) = [x for x in (run_dir / "report.md").read_text().splitlines() if x.startswith("- not recorded: ")]
    keys = [c.key for c in Shard.parse("2/2").select(cells)]
    assert line == f"- not recorded: 4 of 8 cells have no record: {'; '.join(keys)}"  # no resume: a merge


def test_select_counts_the_cells_without_a_record_even_on_an_ended_run(tmp_path, capsys):
    run_dir, cells = _started(tmp_path)
    for cell in cells[:6]:
        _record(run_dir, cell)
    write_json_atomic(run_dir / RUN, {**read_run(run_dir), "ended": "2026-01-01T00:01:00Z"})
    main(["select", str(run_dir), "--json"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["run_ended"] is True and data["unrecorded_cells"] == [c.key for c in cells[6:]]
    assert err == (f"infermatrix select: warning: {run_dir}: 2 of 8 cells have no record; the choice is among the "
                   "cells recorded so far\n")
    write_json_atomic(run_dir / RUN, {**read_run(run_dir), "ended": None})
    main(["select", str(run_dir)])
    assert capsys.readouterr().err == (
        f"infermatrix select: warning: {run_dir}: it has not ended (interrupted, or still running); 2 of 8 cells "
        "have no record; the choice is among the cells recorded so far\n")
    for cell in cells[6:]:
        _record(run_dir, cell)
    write_json_atomic(run_dir / RUN, {**read_run(run_dir), "ended": "2026-01-01T00:02:00Z"})
    main(["select", str(run_dir), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["unrecorded_cells"] == [] and err == ""


def test_the_gate_refuses_to_pass_over_cells_neither_run_recorded(tmp_path, capsys):
    """Two runs stopped at the same cell: the cells after it were never gated, and compare says so."""
    runs = {}
    for side in ("base", "head"):
        (tmp_path / side).mkdir()
        runs[side], cells = _started(tmp_path / side)
        for cell in cells[:5]:
            _record(runs[side], cell)
    assert main(["compare", str(runs["base"]), str(runs["head"])]) == 2
    keys = [c.key for c in cells[5:]]
    assert capsys.readouterr().err == (
        "infermatrix compare: error: 3 cells are not recorded in both runs (use --allow-unmatched to skip them): "
        + "; ".join(f"{k} (in both matrices, recorded in neither run)" for k in keys) + "\n")
    assert main(["compare", str(runs["base"]), str(runs["head"]), "--allow-unmatched"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("Cells not recorded in both runs (skipped): 3")
    assert out[at + 2:at + 5] == [f"- {k} (in both matrices, recorded in neither run)" for k in keys]
    _record(runs["head"], cells[5])  # now only in head: the unmatched listing says so, once
    assert main(["compare", str(runs["base"]), str(runs["head"])]) == 2
    err = capsys.readouterr().err
    assert f"{keys[0]} (only in head)" in err and err.count(keys[0]) == 1
    assert f"{keys[1]} (in both matrices, recorded in neither run)" in err


def test_history_refuses_an_ended_run_short_of_cells_unless_partial(tmp_path, capsys):
    run_dir, cells = _started(tmp_path)
    for cell in cells[:7]:
        _record(run_dir, cell)
    write_json_atomic(run_dir / RUN, {**read_run(run_dir), "ended": "2026-01-01T00:01:00Z"})
    db = tmp_path / "h.sqlite"
    assert main(["history", "add", str(run_dir), "--db", str(db)]) == 2
    assert capsys.readouterr().err.startswith(
        f"infermatrix history: error: {run_dir}: 1 of 8 cells have no record: finish it")
    assert main(["history", "add", str(run_dir), "--db", str(db), "--partial"]) == 0
    assert capsys.readouterr().err == (f"infermatrix history: warning: {run_dir}: 1 of 8 cells have no record; "
                                       "adding the cells it holds\n")


def test_the_gate_says_whose_matrix_holds_a_cell_neither_run_recorded(tmp_path, capsys):
    """Revisions differ in their matrices: a cell only base's, or only head's, matrix holds is named so."""
    variants = {"base": ["fp32", "bf16", "prune-50"], "head": ["fp32", "bf16", "prune-ffn-25"]}
    runs, planned = {}, {}
    for side, names in variants.items():
        (tmp_path / side).mkdir()
        runs[side], planned[side] = _started(tmp_path / side, data={**MATRIX, "variants": names})
        for cell in planned[side]:
            if cell.recipe.name == "fp32":
                _record(runs[side], cell)
    assert main(["compare", str(runs["base"]), str(runs["head"]), "--allow-unmatched"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("Cells not recorded in both runs (skipped): 6")
    where = {"bf16": "both matrices", "prune-50": "base's matrix", "prune-ffn-25": "head's matrix"}
    assert out[at + 2:at + 8] == sorted(f"- {c.key} (in {where[c.recipe.name]}, recorded in neither run)"
                                        for c in planned["base"][2:] + planned["head"][4:])
