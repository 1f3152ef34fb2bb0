"""Whole-matrix guarantees: SIGKILL + resume, sharding + merge, the Ray launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from bench.matrix import expand, load_matrix
from bench.results import read_records, validate_record
from tests.bench.faulty import make_faulty

MATRIX = """
name = "small"
models = [MODEL]
trust_remote_code = true
variants = ["fp32", "bf16"]
devices = ["cpu"]

[[scenarios]]
name = "generate"
batch_size = [1, 2]
prompt_tokens = [16]
new_tokens = [4]

[measure]
warmup = 0
min_reps = 1
max_reps = 2
budget_s = 0
timeout_s = 120
roofline = false

[drift]
enabled = false
"""


def _infermatrix(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _lines(run_dir: Path) -> list[dict]:
    path = run_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory, tiny_ref) -> Path:
    """The tiny Llama behind its own modelling code, whose bf16 forward waits while ``FAULTY_GATE`` names a
    file that exists: a test holds the run at a known cell, however fast the cells before it finish."""
    root = tmp_path_factory.mktemp("matrix")
    model = make_faulty(Path(tiny_ref.path), root / "gated", "gate", dtypes=("torch.bfloat16",))
    path = root / "small.toml"
    path.write_text(MATRIX.replace("MODEL", json.dumps(str(model))))
    return path


@pytest.fixture(scope="module")
def full_run(matrix_file, tmp_path_factory, cache_dir) -> Path:
    """The unsharded run, killed with SIGKILL while its first bf16 cell is held, and resumed.

    Seen: killed once its first record appeared, the run had written all four before the kill landed.
    """
    root = tmp_path_factory.mktemp("runs")
    run_dir, gate = root / "full", root / "gate"
    gate.touch()
    proc = _infermatrix("run", str(matrix_file), "--out", str(run_dir), "--quiet",
                        env={**os.environ, "FAULTY_GATE": str(gate)})
    held = Path(f"{gate}.pid")
    deadline = time.time() + 300
    while not held.exists():  # test-side polling only; the harness itself never polls
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cell = psutil.Process(int(held.read_text()))  # in a session of its own: the kill did not reach it
    cell.kill()
    psutil.wait_procs([cell], timeout=60)
    gate.unlink()
    killed_with = _lines(run_dir)
    assert [r["recipe"]["name"] for r in killed_with] == ["fp32", "fp32"], killed_with  # the cells before the held one
    resumed = _infermatrix("run", "--resume", str(run_dir), "--quiet")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    return run_dir


@pytest.mark.slow
def test_sigkilled_run_resumes_with_every_cell_exactly_once(full_run, matrix_file):
    lines = _lines(full_run)
    ids = [r["cell_id"] for r in lines]
    assert len(ids) == len(set(ids)) == 4, ids
    expected = {c.cell_id for c in expand(load_matrix(matrix_file))}
    assert set(ids) == expected
    assert all(r["status"] == "ok" for r in lines)
    for r in lines:
        validate_record(r)
    run = json.loads((full_run / "run.json").read_text())
    assert run["ended"] and run["environment"]["cpu_logical_cores"] >= 1


def test_resuming_a_finished_run_runs_nothing_and_keeps_its_end_and_reports(full_run):
    run_json, results = (full_run / "run.json").read_bytes(), (full_run / "results.jsonl").read_bytes()
    report = full_run / "report.md"
    stamp = report.stat().st_mtime_ns
    proc = _infermatrix("run", "--resume", str(full_run), "--quiet")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"every cell of {full_run} already has its record (ended " in out and "nothing to run" in out
    assert (full_run / "run.json").read_bytes() == run_json and (full_run / "results.jsonl").read_bytes() == results
    assert report.stat().st_mtime_ns == stamp
    # Seen: one report lost since made the resume render all three again, losing a hand edit in another.
    edited = {name: (full_run / name).read_bytes() + b"\nedited by hand\n" for name in ("report.html", "results.csv")}
    for name, data in edited.items():
        (full_run / name).write_bytes(data)
    report.unlink()  # a report lost since: written again, the other reports and the run's files untouched
    proc = _infermatrix("run", "--resume", str(full_run), "--quiet")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and report.read_text() == _render_md(full_run), out
    assert f"reports: {report}\n" in out  # the missing one alone
    assert {name: (full_run / name).read_bytes() for name in edited} == edited
    assert (full_run / "run.json").read_bytes() == run_json and (full_run / "results.jsonl").read_bytes() == results


def _render_md(run_dir: Path) -> str:
    from bench.report.write import render

    return render(run_dir, "md")


@pytest.mark.slow
def test_two_shards_merged_equal_the_unsharded_run(full_run, matrix_file, tmp_path):
    shards = []
    for i in (1, 2):
        out = tmp_path / f"shard{i}"
        proc = _infermatrix("run", str(matrix_file), "--shard", f"{i}/2", "--out", str(out), "--quiet")
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        assert len(_lines(out)) == 2  # balanced
        shards.append(out)
    assert {r["cell_id"] for r in _lines(shards[0])}.isdisjoint({r["cell_id"] for r in _lines(shards[1])})
    merged = tmp_path / "merged"
    proc = _infermatrix("merge", *map(str, shards), "--out", str(merged))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert {r["cell_id"] for r in read_records(merged)} == {r["cell_id"] for r in read_records(full_run)}
    assert all(r["status"] == "ok" for r in read_records(merged))


def test_merge_refuses_runs_of_different_matrices(full_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    run = json.loads((full_run / "run.json").read_text())
    run["matrix_hash"] = "0" * 16
    (other / "run.json").write_text(json.dumps(run))
    proc = _infermatrix("merge", str(full_run), str(other), "--out", str(tmp_path / "m"))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "ran a different matrix" in output


@pytest.mark.slow
def test_ray_launcher_produces_the_same_records_as_local(full_run, matrix_file, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    out = tmp_path / "ray"
    proc = _infermatrix("run", str(matrix_file), "--launcher", "ray", "--out", str(out), "--quiet")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    local = {r["cell_id"]: r for r in read_records(full_run)}
    remote = {r["cell_id"]: r for r in read_records(out)}
    assert remote.keys() == local.keys()
    for cid, r in remote.items():
        validate_record(r)
        assert r["status"] == local[cid]["status"] == "ok"
        assert r["scenario"] == local[cid]["scenario"] and r["recipe"] == local[cid]["recipe"]
        assert r["metrics"].keys() == local[cid]["metrics"].keys()
    assert json.loads((out / "run.json").read_text())["launcher"] == "ray"


def test_a_ray_cpu_cell_asks_for_one_nodes_cpus_never_the_clusters_total():
    """Asked for the cluster's total CPUs (what ``available_resources`` sums), a cell fits no node of a
    cluster of several: Ray holds it as infeasible and the run waits forever."""
    from bench.launchers.ray import RayNodesWarning, node_cpus

    def node(address, cpus, alive=True):
        return {"NodeManagerAddress": address, "Alive": alive, "Resources": {"CPU": float(cpus), "GPU": 1.0}}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alike nodes: no warning
        assert node_cpus([node("10.0.0.1", 16), node("10.0.0.2", 16), node("10.0.0.3", 64, alive=False)]) == 16
        assert node_cpus([node("10.0.0.1", 8)]) == 8
        assert node_cpus([]) == 1  # nothing known: one CPU, as Ray's default task asks
    with pytest.warns(RayNodesWarning, match=r"10\.0\.0\.1: 8, 10\.0\.0\.2: 32\): a CPU cell asks for 32, every CPU "
                                             r"of the largest node, so 10\.0\.0\.1 run no CPU cell"):
        assert node_cpus([node("10.0.0.1", 8), node("10.0.0.2", 32), {"Alive": True, "Resources": {"GPU": 1.0}}]) == 32


def test_a_ray_cuda_cell_gets_its_share_of_the_nodes_cpus_and_a_warning_where_no_node_has_a_gpu_yet(monkeypatch):
    import sys
    from types import SimpleNamespace

    from bench.launchers.ray import RayLauncher, gpu_cell_cpus

    def node(cpus, gpus, alive=True):
        return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}

    assert gpu_cell_cpus([node(64, 8), node(16, 1), node(96, 0)]) == 8  # the smallest share of a GPU node
    assert gpu_cell_cpus([node(4, 8)]) == 1 and gpu_cell_cpus([node(96, 0), node(8, 8, alive=False)]) is None
    submitted = []

    class Task:
        def options(self, **options):
            return SimpleNamespace(remote=lambda kind, spec, *rest: submitted.append((spec, options)) or len(submitted))

    nodes = [node(32, 0)]
    fake = SimpleNamespace(is_initialized=lambda: True, nodes=lambda: nodes, remote=lambda fn: Task(),
                           wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=lambda ref: {"status": "ok"})
    monkeypatch.setitem(sys.modules, "ray", fake)
    jobs = [("cell", {"device": "cuda", "id": 1}, 60.0), ("cell", {"device": "cpu", "id": 2}, 60.0)]
    # No GPU node yet: an autoscaling cluster starts one for the waiting job, so it is submitted, with a warning
    with pytest.warns(UserWarning, match="no live Ray node has a GPU: the CUDA jobs wait until one joins"):
        out = list(RayLauncher().run(jobs))
    assert [o for _, o in out] == [{"status": "ok"}] * 2
    assert submitted == [(jobs[0][1], {"num_gpus": 1, "num_cpus": 1}), (jobs[1][1], {"num_cpus": 32})]
    nodes[:] = [node(32, 0), node(64, 8)]
    submitted.clear()
    with pytest.warns(UserWarning, match="run no CPU cell"):
        launcher = RayLauncher()
    assert [o for _, o in launcher.run(jobs)] == [{"status": "ok"}] * 2
    assert [o for _, o in submitted] == [{"num_gpus": 1, "num_cpus": 8}, {"num_cpus": 64}]
    # More threads than the largest node's CPUs: each CPU cell would time its threads' contention
    nodes[:] = [node(4, 1)]
    threads = [("cell", {"device": "cuda", "measure": {"threads": 64}}, 60.0),  # a CUDA cell's are not checked
               ("cell", {"device": "cpu", "measure": {"threads": 4}}, 60.0)]
    for job in (("cell", {"device": "cpu", "measure": {"threads": 8}}, 60.0),
                ("roofline", {"device": "cpu", "threads": 8}, 60.0)):  # a ceiling job: threads at the top
        with pytest.warns(UserWarning, match=r"threads 8 is more than the 4 CPUs a CPU job asks for: its threads "
                                             r"share cores"):
            list(RayLauncher().run([*threads, job]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(RayLauncher().run(threads))) == 2
