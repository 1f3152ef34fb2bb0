"""Run cells and variant builds in isolated processes, and a matrix through a launcher.

Each job is forked from a server that has only imported torch and transformers. The
parent never polls: it blocks on the child's exit while the child runs (a timer thread
kills the child's process group at the timeout), so the measured process has every core
to itself. Children die with their parent (PR_SET_PDEATHSIG), so a killed run leaves no
orphan competing with the next one.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.results import failed_record

LOG_TAIL_LINES = 15


_CONTEXT = None


def _context():
    """A fork server that has imported torch and transformers once (see ``bench.preload``)."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["bench.preload"])
    return _CONTEXT


def _child(argv: list[str], log_path: str) -> None:
    """Entry point of a job's process: own process group, dies with its parent, output to the log."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from bench.cell import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_job(kind: str, spec: dict[str, Any], work_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one job of ``bench.cell`` in a fresh process and return its output.

    The process is forked from a server that has imported torch and transformers and done
    nothing else, so each job starts clean and fast.

    ``kind`` is "cell", "build" (a variant's stored artifact) or "reference" (drift's fp32
    pass). On a crash, signal or timeout the result is
    ``{"status": "failed", "error": ...}`` with the cause and the log's last lines.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    keys = {"cell": "cell_id", "build": "build_id", "reference": "reference_id", "roofline": "device",
            "probe": "probe_id"}
    name = spec[keys[kind]]
    spec_path, out_path, log_path = (work_dir / f"{name}.{kind}.{ext}" for ext in ("json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    flags = [] if kind == "cell" else [f"--{kind}"]
    timed_out = threading.Event()
    t0 = time.perf_counter()
    proc = _context().Process(target=_child, args=([*flags, str(spec_path), str(out_path)], str(log_path)),
                              name=f"infermatrix-{kind}-{name}")
    proc.start()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own group: take its helpers too
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    try:
        proc.join()  # blocks on the child's sentinel: no CPU taken from the child
    finally:
        timer.cancel()
    returncode = proc.exitcode
    wall_s = time.perf_counter() - t0
    if timed_out.is_set():
        error = f"timed out after {timeout_s:g} s (process group killed)"
    elif out_path.exists() and returncode == 0:
        result = json.loads(out_path.read_text())
        result.setdefault("timing_s", {})["process_wall"] = wall_s
        return result
    elif returncode < 0:
        error = f"cell process died with signal {signal.Signals(-returncode).name}"
    else:
        error = f"cell process exited with code {returncode} and no result"
    tail = _tail(log_path)
    return {"status": "failed", "error": error + (f"\n{tail}" if tail else ""), "timing_s": {"process_wall": wall_s}}


def cell_result_to_record(cell: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A cell's record from its job output: the child's own record, or a failed one from the parent."""
    if "cell_id" in result:
        record = result
    else:
        record = failed_record(cell, result["error"])
        record["timing_s"].update(result.get("timing_s", {}))
    timing = record["timing_s"]
    if "process_wall" in timing and "measure" in timing:
        # Harness overhead: everything the cell process did besides the measured repetitions.
        timing["harness_overhead"] = timing["process_wall"] - timing["measure"]
    return record
