"""Bad input refused through the command line a user runs: exactly one stderr line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, **(env or {})})


def _refused(proc: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2 with ``line`` as the whole of stderr."""
    assert (proc.returncode, proc.stderr) == (2, line + "\n"), (proc.returncode, proc.stderr[-3000:])


def _needs(path: str) -> None:
    if not os.path.isdir(path):
        pytest.skip(f"no {path} on this system")


# --- folders that cannot be written, though os.access says yes to root -----------------------


@pytest.mark.parametrize(("flag", "value", "cause"), [
    ("--cache-dir", "/proc/nope", "--cache-dir /proc/nope cannot be created: /proc is not writable"),
    ("--cache-dir", "/sys", "--cache-dir /sys is not writable"),
    ("--logs-dir", "/sys/nope", "--logs-dir /sys/nope cannot be created: /sys is not writable"),
])
def test_run_refuses_a_pseudo_filesystem_folder_before_anything_is_written(tmp_path, flag, value, cause):
    _needs("/" + value.split("/")[1])
    out = tmp_path / "out"
    proc = _cli("run", "--model", "synthetic:llama-tiny", "--variants", "fp32", "--out", out, flag, value, "--quiet")
    _refused(proc, f"infermatrix run: error: {cause}")
    assert not out.exists()
