"""What a job is doing, kept where its parent can read it after the job is killed or dies.

A job killed at its time limit cannot say what it was doing, and one that hangs or crashes
in native code cannot say anything. So the job keeps its phase (and, while it repeats a
timed call, how many calls are done) in a small file beside its log, rewritten in place at
each step: two system calls, outside any timed region. The file lives in the page cache, so
it survives the job's SIGKILL; the parent quotes it in the failed record's error
("timed out after 240 s (process group killed) while measuring: 37 repetitions done ...").

A cell's figures are complete before its drift is scored, which can take longer than its
measurement (a compiled decode step compiles again for drift's batch) or meet a native crash.
So the cell writes its record as it stands at that point beside its result
(``provisional_path``); a job that then ends without its result still yields the speed and
memory figures, with the drift marked failed and why.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_fd: int | None = None


def track(path: Path | str, phase: str) -> None:
    """Keep this process's phase in ``path`` from now on, starting with ``phase``."""
    global _fd
    _fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    enter(phase)


def enter(phase: str, detail: str = "") -> None:
    """Say what the job does now (``phase``) and how far it got (``detail``); nothing when not tracked."""
    if _fd is None:
        return
    data = json.dumps({"phase": phase, "detail": detail, "at": time.time()}).encode()
    try:
        os.ftruncate(_fd, 0)
        os.pwrite(_fd, data, 0)
    except OSError:  # a full disk must not fail the measurement; the parent then quotes an older phase
        pass


def provisional_path(out_path: Path) -> Path:
    """Where a job keeps the result it would return if it ended now (beside ``out_path``, its final result)."""
    return out_path.with_name(out_path.name.removesuffix(".out.json") + ".provisional.json")


def describe(path: Path, now: float | None = None) -> str:
    """" while <phase>: <detail> (last step <s> s before the end)", or "" when the job left no phase."""
    try:
        state = json.loads(path.read_text())
        phase, detail, at = str(state["phase"]), str(state.get("detail") or ""), float(state["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    ago = max(0.0, (time.time() if now is None else now) - at)
    return f" while {phase}" + (f": {detail}" if detail else "") + f" (last step {ago:.1f} s before the end)"
