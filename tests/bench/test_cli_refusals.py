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


# --- merge into a place that cannot hold the merged run --------------------------------------


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Two hand-made shard runs of one matrix (no cell runs)."""
    from tests.bench.test_merge import _ok, _shard

    return [_shard(tmp_path, "a", [_ok("v0")], 1), _shard(tmp_path, "b", [_ok("v1")], 2)]


@pytest.mark.parametrize(("out", "folder"), [("/sys/x", "/sys"), ("/proc/x", "/proc")])
def test_merge_into_a_pseudo_filesystem_is_one_line_naming_out(shards, out, folder):
    _needs(folder)
    _refused(_cli("merge", *shards, "--out", out), f"infermatrix merge: error: --out {out}: its folder {folder} "
                                                   "is not writable")
    assert not os.path.lexists(out)


def test_merge_whose_output_fails_after_the_check_is_one_line_naming_out(shards, capsys, monkeypatch):
    """A folder that passed the check but refuses the merged run's temporary sibling (it changed since, or
    the check could not tell): exit 2 naming --out, not a PermissionError traceback.
    """
    from bench.cli import main

    _needs("/sys")
    monkeypatch.setattr("optimize.atomic.folder_problem", lambda folder: None)
    assert main(["merge", *map(str, shards), "--out", "/sys/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infermatrix merge: error: --out /sys/x: cannot write the merged run there (") \
        and err.endswith(")\n") and err.count("\n") == 1, err
