"""One run per run directory: an advisory ``fcntl`` lock held by the parent for the whole run.

The lock is taken before anything is probed or written, so two ``infermatrix run --out
SAME`` started together cannot both pass the "already holds a run" check. The kernel
drops it when the holder exits, however it exits (a SIGKILL included), so ``--resume``
after a crash never meets a stale lock. The holder's PID is written into the lock file
so that the refused run can name it.

A run refused after taking the lock (bad input found while holding it) calls ``discard()``,
which removes the lock file and the directories ``acquire()`` created, so that a refused
run leaves nothing behind. A racer that opened the file before it was removed notices,
once it holds the lock, that its file is no longer the one at the path, and locks afresh.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from optimize.errors import InputError

LOCK = ".infermatrix.lock"


def holder_pid(run_dir: Path) -> int | None:
    """The PID of the run holding ``run_dir``'s lock, or None when none does; read from /proc/locks, which
    takes no lock (a probe that locked, however briefly, could refuse a run starting at that moment).
    """
    try:
        st = (Path(run_dir) / LOCK).stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 25102 fe:00:2147162 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file and fields[4].isdigit():
            return int(fields[4])
    return None


class RunLock:
    """Exclusive lock on a run directory; a context manager, released on close or exit."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None
        self._created_file = False
        self._created_dirs: list[Path] = []  # deepest first: what discard() removes where empty

    def acquire(self) -> RunLock:
        """Take the lock or raise ``InputError`` naming the process that holds it."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"run directory {self.run_dir} is in use by another infermatrix run (PID {holder}); "
                                 "wait for it to finish or use another directory") from None
            if self._is_current(fd):
                break
            os.close(fd)  # a refused run removed this file after we opened it: lock the one at the path now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        """A descriptor of the lock file, creating it (and the run directory) where missing."""
        error: OSError | None = None
        for _ in range(3):  # the file (or directory) can vanish between two calls when a refused run discards it
            try:
                missing = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._created_dirs = self._created_dirs or missing
                self._created_file = False
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    self._created_file = True
                    return fd
                except FileExistsError:
                    return os.open(self.path, os.O_RDWR)
            except FileNotFoundError as exc:
                error = exc
            except OSError as exc:
                error = exc
                break
        raise InputError(f"run directory {str(self.run_dir)!r} cannot be created or written: "
                         f"{error.strerror or error}") from None

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at the lock's path (not one a refused run removed)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def discard(self) -> None:
        """Release, removing the lock file and the directories ``acquire()`` created, where empty.

        For a run refused while holding the lock: a refused run writes nothing. A lock file
        that was there before (a run's own, kept for later runs and resumes) stays.
        """
        if self._fd is None:
            return
        if self._created_file:
            self.path.unlink(missing_ok=True)  # still locked: a racer holding the old file re-locks (_is_current)
        for folder in self._created_dirs:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else is there now
                break
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
