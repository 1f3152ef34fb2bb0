"""One run per run directory: an advisory ``fcntl`` lock held by the parent for the whole run.

The lock is taken before anything is probed or written, so two ``infermatrix run --out
SAME`` started together cannot both pass the "already holds a run" check. The kernel
drops it when the holder exits, however it exits (a SIGKILL included), so ``--resume``
after a crash never meets a stale lock. The holder's PID is written into the lock file
so that the refused run can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from optimize.errors import InputError

LOCK = ".infermatrix.lock"


class RunLock:
    """Exclusive lock on a run directory; a context manager, released on close or exit."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``InputError`` naming the process that holds it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"run directory {str(self.run_dir)!r} cannot be created or written: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"run directory {self.run_dir} is in use by another infermatrix run (PID {holder}); "
                             "wait for it to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
