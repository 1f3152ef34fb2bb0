"""Directories built in a temporary sibling and renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def build_dir_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a temporary sibling of ``final``, then rename it to ``final``.

    A crash leaves no half-written ``final``; when a concurrent builder got there first,
    its directory is kept and ours is dropped.
    """
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another builder finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
