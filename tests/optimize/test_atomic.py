"""``folder_problem``: whether files can be created in a folder, found by trying, with nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimize.atomic import folder_problem


def _pseudo(path: str) -> Path:
    if not os.path.isdir(path):
        pytest.skip(f"no {path} on this system")
    return Path(path)


@pytest.mark.parametrize(("folder", "problem"), [
    ("/proc", "is not writable"),
    ("/proc/nope/deeper", "cannot be created: /proc is not writable"),
    ("/sys", "is not writable"),
    ("/sys/nope", "cannot be created: /sys is not writable"),
])
def test_pseudo_filesystems_are_not_writable_even_for_root(folder, problem):
    """``os.access`` says yes to root on /proc and /sys; creating a file there fails all the same."""
    _pseudo("/" + folder.split("/")[1])
    assert folder_problem(Path(folder)) == problem


def test_a_writable_folder_passes_and_keeps_nothing_of_the_check(tmp_path):
    (tmp_path / "mine.toml").write_text("x")
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml"]  # no probe file, no folder made


def test_a_file_in_the_way_is_not_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert folder_problem(tmp_path / "afile") == "is not a directory"
    assert folder_problem(tmp_path / "afile" / "sub") == f"cannot be created: {tmp_path / 'afile'} is not a directory"
