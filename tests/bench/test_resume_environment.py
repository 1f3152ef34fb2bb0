"""A resume measures its remaining cells only where the gate would compare them with the recorded ones;
records say where and when they were measured, and reports say when a run spans machines."""

from __future__ import annotations

import json
import platform
import re

import pytest

from bench.cli import main as cli
from bench.compare import environment_changes
from bench.env import environment
from bench.matrix import load_matrix, narrow
from bench.orchestrate import start_run
from bench.report.markdown import run_facts
from bench.results import RESULTS, RUN, read_records, read_run
from bench.runner import probe_torch


def _started_elsewhere(tmp_path, cpu_model: str | None):
    """A run of one tiny cell, started (no cell recorded yet) on a machine like this one but for its CPU model."""
    matrix = narrow(load_matrix(), models=["synthetic:llama-tiny"], variants=["fp32"], devices=["cpu"],
                    batch_size=[1], prompt_tokens=[8], new_tokens=[2], drift=False, threads=1,
                    repeat={"warmup": 0, "min_reps": 1, "max_reps": 1, "budget_s": 0})
    env = {**environment(with_torch=False), "torch": probe_torch(tmp_path / "probe")}
    if cpu_model is not None:
        env["cpu_model"] = cpu_model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment=env)
    return run_dir, env


def test_this_machine_is_what_a_run_started_here_recorded(tmp_path):
    _, env = _started_elsewhere(tmp_path, None)
    assert environment_changes(env, {**environment(with_torch=False), "torch": probe_torch(tmp_path / "p2")}) == []


@pytest.mark.slow
def test_a_resume_on_another_cpu_is_refused_then_recorded_when_allowed(tmp_path, capsys, cache_dir):
    run_dir, env = _started_elsewhere(tmp_path, "Other CPU @ 1.0GHz")
    elsewhere = {"cpu": {"memory": {"bandwidth_gbps": 1.0}, "matmul": {"float32": {"tflops": 0.001}},
                         "torch_threads": 1}}  # ceilings of the machine it started on
    run = read_run(run_dir)
    (run_dir / RUN).write_text(json.dumps({**run, "roofline": elsewhere}))
    before = (run_dir / RUN).read_bytes()

    assert cli(["run", "--resume", str(run_dir), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    here = environment(with_torch=False)["cpu_model"]
    assert err == [f"infermatrix run: error: --resume {run_dir}: this machine differs from where the run started: "
                   f"cpu_model is {here!r} here, 'Other CPU @ 1.0GHz' where the run started; its 1 remaining "
                   "cell would be measured in another environment than the one run.json records (start a new run, "
                   "or resume with --allow-env-mismatch: run.json then records the difference)"]
    assert (run_dir / RUN).read_bytes() == before and not (run_dir / RESULTS).exists()

    assert cli(["run", "--resume", str(run_dir), "--quiet", "--no-report", "--allow-env-mismatch"]) == 0
    assert "warning: resuming in a differing environment (cpu_model is" in capsys.readouterr().err
    run = read_run(run_dir)
    [difference] = run["environment_differences"]
    assert difference.startswith("resumed ") and difference.endswith(
        f" on {env['hostname']}: cpu_model is {here!r} here, 'Other CPU @ 1.0GHz' where the run started")
    assert run["environment"] == json.loads(before)["environment"]  # what the run started with stays
    [record] = read_records(run_dir)
    assert record["status"] == "ok"
    assert record["host"] == platform.node() == env["hostname"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["started_at"])
    # the ceilings were measured again here: the new cell's fraction is of this machine's, as its record says
    assert [e["roofline"] for e in run["earlier_rooflines"]] == [elsewhere]
    assert run["roofline"]["cpu"]["memory"]["bandwidth_gbps"] > 1.0
    assert record["metrics"]["roofline_ceilings"]["bandwidth_gbps"] == \
        run["roofline"]["cpu"]["memory"]["bandwidth_gbps"]
    [moved] = run["roofline_differences"]
    assert moved.startswith("resumed ") and moved.endswith(" the ceilings were measured again there")
    fact = run_facts(run, read_records(run_dir))["environments differ"]
    assert fact.startswith(difference) and "not all measured in one environment" in fact


def test_allow_env_mismatch_is_for_a_resume_only(tmp_path, capsys):
    assert cli(["run", "--allow-env-mismatch", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("infermatrix run: error: --allow-env-mismatch applies to --resume "
                                               "only (a new run has one environment)")
    assert not (tmp_path / "out").exists()


def test_a_run_whose_records_name_two_hosts_says_so_in_its_facts():
    from tests.bench.example_records import example_records

    records = example_records()
    assert run_facts({"matrix": {"name": "x"}}, records).get("hosts") is None  # one host (or none recorded)
    for i, r in enumerate(records):
        r["host"] = "node-b" if i % 3 == 0 else "node-a"
    a, b = sum(r["host"] == "node-a" for r in records), sum(r["host"] == "node-b" for r in records)
    assert run_facts({"matrix": {"name": "x"}}, records)["hosts"] == \
        f"measured on 2 hosts: node-a ({a} cells), node-b ({b} cells)"
    records[0]["host"] = "node-c"
    assert "node-c (1 cell)" in run_facts({"matrix": {"name": "x"}}, records)["hosts"]
