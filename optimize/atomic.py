"""Files and directories written to a temporary sibling and renamed into place; stale siblings swept."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path


class StaleTemporaryWarning(UserWarning):
    """Temporary files or directories of a killed process were found and removed."""


# ``NAME.tmpPID@HOST``: the temporary sibling a builder with process id PID on HOST fills. The
# host keeps a sweep on one machine of a shared cache (Ray workers) off another machine's builds.
TMP_SUFFIX = re.compile(r"\.tmp(\d+)(?:@([A-Za-z0-9._-]+))?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"


def tmp_sibling(final: Path) -> Path:
    return final.with_name(f"{final.name}.tmp{os.getpid()}@{_host()}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary sibling, then a rename over ``path``.

    A concurrent reader sees the old content or the new. A failure (a full disk, an interrupt)
    removes the temporary and raises the original error; a process killed outright leaves it
    for ``sweep_stale_tmp``.
    """
    tmp = tmp_sibling(path)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole: a regular file (or a new one, its folders created) through ``write_atomic``.

    A symbolic link (``/dev/stdout``), a device or a pipe is written through in place: a rename
    would replace the link or node itself, not what it leads to.
    """
    if os.path.islink(path) or (os.path.exists(path) and not Path(path).is_file()):
        with open(path, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), data)


def folder_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (created with its parents when missing), or None.

    Tried, not inferred: ``os.access`` says yes to root everywhere, on ``/proc`` and ``/sys``
    too, where nothing can be created. An existing ``folder`` gets a temporary file, a missing
    one a temporary directory in its nearest existing ancestor; both are removed at once.
    """
    base = folder
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent  # the nearest existing folder, in which the missing ones would be created
    created = "" if base == folder else f"cannot be created: {base} "
    if not base.is_dir():
        return f"{created}is not a directory"
    if not os.access(base, os.W_OK | os.X_OK) or not _can_create(base, folder=bool(created)):
        return f"{created}is not writable"
    return None


def _can_create(parent: Path, folder: bool) -> bool:
    """Whether a file (or, with ``folder``, a directory) can be made in ``parent``: made, then removed.

    The name is a temporary sibling's (``.tmpPID@HOST``), so ``sweep_stale_tmp`` removes one that a
    killed process left.
    """
    suffix = f".tmp{os.getpid()}@{_host()}"
    try:
        if folder:
            os.rmdir(tempfile.mkdtemp(prefix=".infermatrix-check-", suffix=suffix, dir=parent))
        else:
            fd, path = tempfile.mkstemp(prefix=".infermatrix-check-", suffix=suffix, dir=parent)
            os.close(fd)
            os.unlink(path)
    except OSError:
        return False
    return True


def build_dir_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a temporary sibling of ``final``, then rename it to ``final``.

    A crash leaves no half-written ``final`` (a killed builder's sibling is removed by
    ``sweep_stale_tmp`` later); when a concurrent builder got there first, its directory
    is kept and ours is dropped.
    """
    tmp = tmp_sibling(final)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_tmp(parent: Path, of: str | None = None) -> list[Path]:
    """Remove ``*.tmpPID`` entries of ``parent`` whose writing process is gone (killed, timed out).

    ``of`` limits the sweep to the temporaries of one entry (``NAME.tmpPID@HOST`` for ``of="NAME"``),
    for a folder that is the user's, not the harness's.

    Returns:
        The removed paths.

    """
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TMP_SUFFIX.search(entry.name)
        if of is not None and m and entry.name[:m.start()] != of:
            continue
        if not m or (m.group(2) and m.group(2) != _host()):
            continue  # not a build directory, or another machine's
        if int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary entr{'y' if len(removed) == 1 else 'ies'} left by killed "
                      f"processes in {parent}", StaleTemporaryWarning, stacklevel=2)
    return removed
