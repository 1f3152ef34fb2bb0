"""Provenance: the user's repository revision and the CPU's features are in the environment record."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.env import cpu_flags, environment, user_repository


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_user_repository_commit_and_dirty_flag_come_from_the_matrix_files_checkout(tmp_path):
    repo = tmp_path / "mine"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "matrix.toml").write_text('variants = ["fp32"]\n')
    _git(repo, "add", "matrix.toml")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "m")
    clean = user_repository(repo / "matrix.toml")
    assert clean == {"path": str(repo.resolve()), "commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "matrix.toml").write_text('variants = ["bf16"]\n')
    assert user_repository(repo / "matrix.toml")["dirty"] is True
    assert environment(with_torch=False, user_path=repo / "matrix.toml")["user_repository"]["dirty"] is True


def test_outside_a_repository_the_commit_is_none(tmp_path):
    assert user_repository(tmp_path) == {"path": str(tmp_path.resolve()), "commit": None, "dirty": None}


def test_cpu_flags_are_recorded_as_proc_cpuinfo_lists_them():
    flags = cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), None)
    assert flags == (sorted(line.split(":", 1)[1].split()) if line else [])
    assert environment(with_torch=False)["cpu_flags"] == flags
