"""The phase a job keeps beside its log, for the parent to quote when the job dies without a result."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from bench import job_phase
from bench.metrics.timing import RepeatConfig, repeat


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """Track phases into a file for this test only (a job's process does so for its whole life)."""
    monkeypatch.setattr(job_phase, "_fd", None)
    path = tmp_path / "job.phase.json"
    job_phase.track(path, "starting")
    yield path
    os.close(job_phase._fd)


def test_untracked_process_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(job_phase, "_fd", None)
    monkeypatch.chdir(tmp_path)
    job_phase.enter("measuring", "3 repetitions done")
    assert list(tmp_path.iterdir()) == []


def test_each_step_replaces_the_last_in_place(tracked):
    at = json.loads(tracked.read_text())["at"]  # a clock of the test's own: a busy host's delays do not count
    assert job_phase.describe(tracked, now=at + 0.3) == " while starting (last step 0.3 s before the end)"
    job_phase.enter("scoring drift", "a long detail " * 20)
    job_phase.enter("loading the variant")  # shorter than what it replaces: nothing of the old text stays
    state = json.loads(tracked.read_text())
    assert (state["phase"], state["detail"]) == ("loading the variant", "")
    text = job_phase.describe(tracked, now=state["at"] + 12.34)
    assert text == " while loading the variant (last step 12.3 s before the end)"


@pytest.mark.parametrize("content", [None, "", "{not json", '{"phase": "x"}', '["phase"]', '{"phase": "x", "at": "?"}'])
def test_a_missing_or_broken_phase_file_adds_nothing(tmp_path, content):
    path = tmp_path / "job.phase.json"
    if content is not None:
        path.write_text(content)
    assert job_phase.describe(path) == ""


def test_repeat_counts_warm_up_calls_and_repetitions_as_it_goes(tracked):
    seen = []

    def call():
        state = json.loads(tracked.read_text())
        seen.append(f"{state['phase']}: {state['detail']}")

    repeat(call, RepeatConfig(warmup=2, min_reps=3, max_reps=3, budget_s=0, target_rel_ci=0))
    asked = "(min_reps 3, max_reps 3, budget_s 0)"
    assert seen[:3] == ["warming up: call 1 of 2", "warming up: call 2 of 2", f"measuring: 0 repetitions done {asked}"]
    assert seen[3].startswith("measuring: 1 repetition done in ") and seen[3].endswith(asked)
    assert seen[4].startswith("measuring: 2 repetitions done in ")
    assert json.loads(tracked.read_text())["detail"].startswith("3 repetitions done in ")


def test_the_phase_outlives_a_sigkilled_process(tmp_path):
    """What the parent reads after the kill: the page cache keeps the last write of a dead process."""
    path = tmp_path / "job.phase.json"
    pid = os.fork()
    if pid == 0:  # the job: track, step, then hang until killed
        try:
            job_phase.track(path, "starting")
            job_phase.enter("measuring", "7 repetitions done")
            time.sleep(60)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 30
    while "7 repetitions" not in (path.read_text() if path.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert job_phase.describe(path).startswith(" while measuring: 7 repetitions done (last step ")


def test_a_kept_provisional_record_becomes_an_ok_record_whose_drift_failed(tmp_path):
    """What the runner makes of the record a cell kept before drift, when the job then ends without a result."""
    from bench.runner import _provisional_result

    path = job_phase.provisional_path(tmp_path / "0123abcd.cell.out.json")
    assert path == tmp_path / "0123abcd.cell.provisional.json"
    error = "timed out after 9 s (process group killed) while scoring drift (last step 8.0 s before the end)\nlog"
    assert _provisional_result(path, error, 9.0) is None  # none kept: the runner records a failed cell
    path.write_text('{"status": "ok", "timing_s": {"to')  # cut short: no record rather than a broken one
    assert _provisional_result(path, error, 9.0) is None
    kept = {"status": "ok", "cell_id": "0123abcd", "metrics": {"tpot_ms": {"p50": 1.0}},
            "timing_s": {"measure": 1.5, "total": 2.0}}
    path.write_text(json.dumps(kept))
    written = time.time() - 3.0
    os.utime(path, (written, written))
    result = _provisional_result(path, error, 9.0)
    drift = result["timing_s"]["drift"]
    assert 3.0 <= drift < 60 and result["timing_s"] == {"measure": 1.5, "total": 2.0 + drift, "process_wall": 9.0,
                                                        "drift": drift}
    assert result["drift_ok"] is False and result["drift_error"] == error
    assert {k: result[k] for k in ("status", "cell_id", "metrics")} == {k: kept[k] for k in ("status", "cell_id",
                                                                                              "metrics")}


def test_the_job_removes_its_provisional_record_once_its_result_is_written(tmp_path, monkeypatch):
    """A death after the result is whole (at exit, say) must not turn the finished record into a failed drift."""
    from bench import cell as cell_mod

    spec, out = tmp_path / "c.cell.json", tmp_path / "c.cell.out.json"
    spec.write_text("{}")
    kept = job_phase.provisional_path(out)

    def measure(job, provisional):
        provisional({"status": "ok", "cell_id": "c", "labels": []})  # before drift
        assert kept.exists()
        return {"status": "ok", "cell_id": "c", "labels": [], "drift_ok": True}

    monkeypatch.setattr(cell_mod, "measure", measure)
    assert cell_mod.main([str(spec), str(out)], ["a note"]) == 0
    assert json.loads(out.read_text()) == {"status": "ok", "cell_id": "c", "labels": ["a note"], "drift_ok": True}
    assert not kept.exists()
