"""The CUDA start-up path on an emulated GPU host (see ``tests/bench/cuda_emulation.py``).

A CPU build of torch is made to report a CUDA device; whatever would initialise CUDA is
recorded. The fork server, and a cell until it chooses its device, must record nothing: on
a real GPU host a child forked from a process that initialised CUDA cannot use CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import runner
from bench.cells import Cell
from bench.scenarios import GenerateScenario
from optimize.recipe import Recipe
from tests.bench.cuda_emulation import LOG_ENV, read_log

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``code`` in a fresh interpreter from the project root; its last stdout line."""
    import os

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _where(call: dict) -> str:
    frames = [line.strip() for line in call["stack"].splitlines() if line.strip().startswith("File")]
    return f"{call['name']} from " + " <- ".join(reversed(frames[-4:]))


def test_fork_server_preload_initialises_no_cuda_on_an_emulated_gpu_host():
    """Everything the server preloads and a job imports before choosing its device, on a 'GPU host'."""
    code = """
import json, os
console = os.dup(1)  # the preload sends this process's output to its log
import tests.bench.emulate_cuda as emu
import torch
available, version = torch.cuda.is_available(), torch.version.cuda
emu.CALLS.clear()  # is_available() above went through the runtime on purpose: start counting now
import bench.preload, bench.runner, bench.cell, bench.scenarios.generate, optimize.registry, optimize.store
import optimize.kvcache, bench.metrics.timing, bench.metrics.memory
calls = list(emu.CALLS)
capability = torch.cuda.get_device_capability()  # proves the recorder is live in this process
visible = getattr(bench.preload, "CUDA_DEVICE_VISIBLE", None)
result = {"available": available, "version": version, "visible": visible,
          "calls": calls, "capability": capability, "after": [c["name"] for c in emu.CALLS[len(calls):]]}
print(json.dumps(result), file=os.fdopen(console, "w"), flush=True)
"""
    result = json.loads(_python(code))
    assert result["available"] and result["version"], "the emulation did not make torch report a CUDA device"
    assert result["calls"] == [], "CUDA touched while preloading:\n" + "\n".join(map(_where, result["calls"]))
    assert result["capability"] == [9, 0]
    assert "torch.cuda._lazy_init" in result["after"], "the recorder missed a capability query"
    assert result["visible"], "the preload did not see the emulated device (NVML count)"


def test_emulation_records_device_queries_through_transformers_and_torchao():
    """The emulation is what catches the H200 failure: importing modeling_utils with torchao installed queries."""
    pytest.importorskip("torchao", reason="the failure this guards against comes through torchao (pip install torchao)")
    code = """
import json, os
console = os.dup(1)  # the preload sends this process's output to its log
import tests.bench.emulate_cuda as emu
import bench.preload
import transformers.modeling_utils
print(json.dumps([c["name"] for c in emu.CALLS]), file=os.fdopen(console, "w"), flush=True)
"""
    calls = json.loads(_python(code))
    assert "torch.cuda._lazy_init" in calls, calls


def _runner_script(body: str) -> str:
    """A script that runs ``body`` with the emulation imported first by the real runner's fork server."""
    return f"""
import json, sys
import multiprocessing.context
from pathlib import Path
from bench import runner
_set = multiprocessing.context.ForkServerContext.set_forkserver_preload
multiprocessing.context.ForkServerContext.set_forkserver_preload = (
    lambda self, names: _set(self, ["tests.bench.emulate_cuda", *names]))
{body}
"""


def test_cuda_cell_through_the_runner_touches_cuda_only_after_choosing_its_device(tmp_path, tiny_ref, cache_dir):
    """A real cuda cell, forked from the real server with the emulation preloaded first.

    The child inherits the emulated torch; the cell gets as far as moving the model to the
    device (where a CPU build must stop). Every CUDA call recorded must come from inside the
    cell's measurement, none from the server or the start of the child.
    """
    log = tmp_path / "cuda-calls.jsonl"
    body = f"""
import dataclasses
from bench.matrix import expand, load_matrix, narrow
matrix = narrow(load_matrix(), models=["synthetic:llama-tiny"], variants=["bf16"], devices=["cuda"], batch_size=[1],
                prompt_tokens=[16], new_tokens=[4], repeat={{"warmup": 0, "min_reps": 1, "max_reps": 1, "budget_s": 0}},
                drift=False)
[cell] = expand(matrix, resolve_device=lambda d: d)
cell = dataclasses.replace(cell, cache_dir={str(cache_dir)!r})
result = runner.run_job("cell", cell.to_dict(), Path({str(tmp_path / "logs")!r}), 300)
record = runner.cell_result_to_record(cell, result)
print(json.dumps(record))
"""
    record = json.loads(_python(_runner_script(body),
                                env={LOG_ENV: str(log)}))
    calls = read_log(log)
    early = [c for c in calls if "in _measure" not in c["stack"]]
    assert not early, "CUDA touched before the cell chose its device:\n" + "\n".join(map(_where, early))
    assert calls, "the cell never reached CUDA: the emulation was not inherited from the server"
    assert len({c["pid"] for c in calls}) == 1  # one process: the cell's, never the server
    assert record["method"]["process_start"] == runner.FORKSERVER
    assert record["device"] == "cuda"


@pytest.mark.slow
def test_cuda_jobs_are_spawned_when_the_fork_server_initialised_cuda(tmp_path):
    """A server poisoned by an import (as torchao did on the H200): CUDA jobs respawn and say so; CPU jobs fork.

    The probe asks torch about the device, so it counts as a CUDA job; a CPU build job (of a
    model that does not exist: it fails at once) still forks from the server.
    """
    log = tmp_path / "cuda-calls.jsonl"
    body = f"""
work = Path({str(tmp_path / "logs")!r})
out = [runner.run_job("probe", {{"probe_id": f"p{{i}}", "device": "cuda"}}, work, 300) for i in range(2)]
out.append(runner.run_job("build", {{"build_id": "b", "model": "/nonexistent/model", "variant": {{"name": "fp32"}},
                                     "device": "cpu", "trust_remote_code": False, "cache_dir": None}}, work, 300))
print(json.dumps(out))
"""
    results = json.loads(_python(_runner_script(body),
                                 env={LOG_ENV: str(log), "INFERMATRIX_TEST_CUDA_POISON": "1"}))
    assert [r["status"] for r in results] == ["ok", "ok", "failed"], results
    assert "/nonexistent/model" in results[2]["error"]
    assert [r["method"]["process_start"] for r in results] == [runner.SPAWN_AFTER_CUDA] * 2 + [runner.FORKSERVER]
    poisoned = read_log(log)
    assert poisoned and len({c["pid"] for c in poisoned}) == 1  # only the server initialised CUDA
    # The spawned probe is a fresh interpreter of the real (CPU) torch: no emulation, no poisoned state.
    assert results[0]["torch"]["cuda_available"] is False


def test_failed_die_with_parent_setting_becomes_a_label(monkeypatch, tmp_path):
    class Libc:
        def prctl(self, option, sig):
            return -1

    monkeypatch.setattr(runner.ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(runner.ctypes, "get_errno", lambda: 1)
    note = runner._die_with_parent()
    assert note and "PR_SET_PDEATHSIG failed (Operation not permitted)" in note
    from bench import cell as cell_mod

    spec, out = tmp_path / "torch.probe.json", tmp_path / "torch.probe.out.json"
    spec.write_text(json.dumps({"probe_id": "torch"}))
    monkeypatch.setitem(cell_mod.JOBS, "--probe", lambda job: {"status": "ok", "labels": ["bf16"]})
    assert cell_mod.main(["--probe", str(spec), str(out)], [note]) == 0  # what the job's process runs
    assert json.loads(out.read_text())["labels"] == ["bf16", note]


def test_die_with_parent_is_set_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    assert runner._die_with_parent() is None


def test_parent_side_failure_keeps_how_the_process_was_started():
    cell = Cell(model="m", recipe=Recipe(name="fp32"), device="cuda", scenario=GenerateScenario())
    result = {"status": "failed", "error": "cell process died with signal SIGSEGV", "timing_s": {"process_wall": 1.0},
              "method": {"process_start": runner.SPAWN_AFTER_CUDA}}
    record = runner.cell_result_to_record(cell, result)
    assert record["method"]["process_start"] == runner.SPAWN_AFTER_CUDA
