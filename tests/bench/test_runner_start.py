"""How the runner starts job processes: import noise stays out of the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_fork_server_import_output_goes_to_the_preload_log_not_the_console(tmp_path):
    """torchao's "Failed to load ..." lines and torch's warnings, printed while the server imports."""
    pytest.importorskip("torchao", reason="the noise checked here is torchao's (pip install torchao)")
    code = f"""
from pathlib import Path
from bench import runner
result = runner.run_job("probe", {{"probe_id": "p"}}, Path({str(tmp_path / "logs")!r}), 300)
assert result["status"] == "ok", result
print("probe ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "INFERMATRIX_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    log = (tmp_path / "cache" / "preload.log").read_text()
    assert "Failed to load" in log  # torchao's extension loader on a host without its CUDA kernels
    console = out.stdout + out.stderr
    assert console.strip() == "probe ok", console[-2000:]


def test_a_job_takes_the_environment_of_its_starter_as_it_is_when_the_job_starts(tmp_path):
    """A program that measures again after changing CUDA_VISIBLE_DEVICES: the later jobs see the change, though
    the fork server started (and forked the first job) before it."""
    code = f"""
import json, os
from pathlib import Path
from bench import runner
work = Path({str(tmp_path / "logs")!r})
seen = []
for value in (None, "3", "1,2"):
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value
    result = runner.run_job("probe", {{"probe_id": "p"}}, work, 300)
    assert result["status"] == "ok" and result["method"]["process_start"] == "forkserver", result
    seen.append(result["env_vars"].get("CUDA_VISIBLE_DEVICES"))
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTORCH_NVML_BASED_CUDA_CHECK")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "INFERMATRIX_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == '[null, "3", "1,2"]'
