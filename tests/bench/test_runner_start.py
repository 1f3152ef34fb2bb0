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
