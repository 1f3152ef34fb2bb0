"""Run cells and variant builds in isolated processes, and a matrix through a launcher.

Each job is forked from a server that has only imported torch and transformers (and never
initialised CUDA: see ``bench.preload``). The parent never polls: it blocks on the child's
exit while the child runs, and kills the child's process group at the timeout,
so the measured process has every core to itself. Children die with their parent
(PR_SET_PDEATHSIG: a job's parent is the fork server, which exits when the run does, since no
job keeps the server's "alive" pipe open), so a killed run leaves no orphan competing with the
next one; where that cannot be set, the record says so.

If a CUDA job finds that the server had initialised CUDA after all (a library touched the
device while being imported), it runs no code and asks to be started again: that job and
every later CUDA job are spawned (a fresh interpreter, slower to start), and their records
say so in ``method.process_start``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import job_phase
from bench.results import RunWriteError, failed_record

LOG_TAIL_LINES = 15
PRELOAD = ["bench.preload"]  # modules the fork server imports once
FORKSERVER = "forkserver"
SPAWN_AFTER_CUDA = "spawn (the fork server had initialised CUDA)"



@dataclass(frozen=True)
class JobTimeouts:
    """Time limits of the jobs a run starts besides its cells (a cell's is ``MeasureConfig.timeout_s``)."""

    roofline_s: float = 600.0  # bandwidth and matmul ceilings of one device, once per run
    probe_s: float = 300.0  # torch's view of the machine: one import of torch, no model


JOB_TIMEOUTS = JobTimeouts()

_CONTEXTS: dict[str, Any] = {}
_SERVER_HAS_CUDA: list[bool] = []  # set once a CUDA child reported a poisoned fork server


def _context(method: str = FORKSERVER):
    """A fork server that has imported torch and transformers once, or the spawn context."""
    if method not in _CONTEXTS:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver" if method == FORKSERVER else "spawn")
        if method == FORKSERVER:
            ctx.set_forkserver_preload(list(PRELOAD))
        _CONTEXTS[method] = ctx
    return _CONTEXTS[method]


def _die_with_parent() -> str | None:
    """Ask the kernel to kill this process when its parent dies; a note when that cannot be done."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as exc:
        return f"process does not die with its parent: no libc.so.6 for PR_SET_PDEATHSIG ({exc})"
    if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG = 1
        err = ctypes.get_errno()
        return f"process does not die with its parent: PR_SET_PDEATHSIG failed ({os.strerror(err)})"
    return None


def _release_server_alive_fd() -> None:
    """Close this job's copy of the write end of the fork server's "alive" pipe.

    multiprocessing hands one to every child (so a child could start processes through the same
    server), and the server exits only once every copy is closed. Kept open, a run killed by
    SIGKILL or SIGTERM left the server up for as long as its job ran, so the job's death signal,
    which follows the server, never came: the orphan went on measuring past its own timeout,
    beside the ``--resume`` that followed.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None  # a process this job starts through multiprocessing gets its own server


def _adopt_environment(environ: dict[str, str]) -> None:
    """Take the environment of the process that started the job, as it is now.

    A forked job inherits the fork server's, which is the starter's at the moment the server started
    (plus what the server set for its own imports): a program that changes ``CUDA_VISIBLE_DEVICES``
    or ``HF_HUB_OFFLINE`` between two runs would otherwise measure with the old values. Variables
    a library read while the server imported it (``OMP_NUM_THREADS`` for OpenMP) keep the server's.
    """
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)


def _cuda_unusable_here() -> bool:
    """True in a process forked after CUDA was initialised (torch then refuses CUDA here)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda._is_in_bad_fork())


def _child(argv: list[str], log_path: str, uses_cuda: bool, phase_path: str, environ: dict[str, str]) -> None:
    """Entry point of a job's process: own process group, dies with its parent, the starter's environment,
    the server's library pages resident (``bench.metrics.resident``), output to the log.
    """
    os.setsid()
    notes = [_die_with_parent()]
    _release_server_alive_fd()  # else the server, and so this job, outlive a killed run
    _adopt_environment(environ)
    server = sys.modules.get("bench.preload")  # None in a spawned job, which has imported nothing yet
    if server is not None:
        from bench.metrics.resident import make_resident

        notes.append(make_resident(server.RESIDENT_FILE_PAGES))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if phase_path:
        job_phase.track(phase_path, "starting")
    out_path = Path(argv[-1])
    if uses_cuda and _cuda_unusable_here():
        out_path.write_text(json.dumps({"respawn": "the fork server had initialised CUDA"}))
        return
    from bench.cell import main

    code = main(argv, [note for note in notes if note])  # process-level notes go into the result's labels
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
    nothing else, so each job starts clean and fast; a CUDA job is spawned instead once the
    server turned out to have initialised CUDA (see the module docstring).

    ``kind`` is "cell", "build" (a variant's stored artifact) or "reference" (drift's fp32
    pass). On a crash, signal or timeout the result is
    ``{"status": "failed", "error": ...}`` with the cause and the log's last lines. The
    result's ``method.process_start`` says how the process was started.
    """
    keys = {"cell": "cell_id", "build": "build_id", "reference": "reference_id", "roofline": "device",
            "probe": "probe_id"}
    name = spec[keys[kind]]
    paths = tuple(work_dir / f"{name}.{kind}.{ext}" for ext in ("json", "out.json", "log", "phase.json"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(json.dumps(spec))
    except OSError as exc:  # the logs folder made read-only, a full disk: every later job would fail alike
        raise RunWriteError(f"could not write {paths[0]} (the job's settings): {exc.strerror or exc}") from None
    uses_cuda = spec.get("device") == "cuda" or kind == "probe"  # the probe asks torch about the device
    method = SPAWN_AFTER_CUDA if uses_cuda and _SERVER_HAS_CUDA else FORKSERVER
    result = _run_process(kind, name, paths, timeout_s, method, uses_cuda)
    if result.get("respawn"):
        _SERVER_HAS_CUDA[:] = [True]
        method = SPAWN_AFTER_CUDA
        result = _run_process(kind, name, paths, timeout_s, method, uses_cuda)
    result.setdefault("method", {})["process_start"] = method
    return result


def probe_torch(work_dir) -> dict[str, Any]:
    """Torch's view of the machine (``bench.env.torch_info``), asked in a job so the parent never imports torch."""
    from optimize.errors import InputError

    result = run_job("probe", {"probe_id": "torch"}, work_dir, JOB_TIMEOUTS.probe_s)
    if result.get("status") != "ok":
        raise InputError(f"could not start a measurement process: {result.get('error', '')[-300:]}")
    return result["torch"]


def _run_process(kind: str, name: str, paths: tuple[Path, ...], timeout_s: float, method: str,
                 uses_cuda: bool) -> dict[str, Any]:
    spec_path, out_path, log_path, phase_path = paths
    provisional = job_phase.provisional_path(out_path)
    for stale in (out_path, phase_path, provisional):
        stale.unlink(missing_ok=True)
    flags = [] if kind == "cell" else [f"--{kind}"]
    t0 = time.perf_counter()
    argv = [*flags, str(spec_path), str(out_path)]
    proc = _context(method).Process(target=_child, args=(argv, str(log_path), uses_cuda, str(phase_path),
                                                         dict(os.environ)), name=f"infermatrix-{kind}-{name}")
    try:
        proc.start()
        # Blocks on the child's sentinel until it exits or the time is up: no CPU taken from the child.
        # No helper thread waits for the timeout: a signal sent to the process (the user's Ctrl-C) may
        # land in any thread that does not block it, and only this one's wait is then interrupted.
        proc.join(timeout_s)
        timed_out = proc.exitcode is None
        if timed_out:
            kill_group(proc)
            proc.join()
    except BaseException:
        # Ctrl-C (or any error) in the parent: the child is in its own session, out of the terminal's
        # reach, so take its group down now rather than leave it measuring for nobody.
        kill_group(proc)
        if proc.pid is not None:
            proc.join()
        raise
    returncode = proc.exitcode
    wall_s = time.perf_counter() - t0
    if timed_out:
        error = f"timed out after {timeout_s:g} s (process group killed)"
    elif out_path.exists() and returncode == 0:
        result = json.loads(out_path.read_text())
        result.setdefault("timing_s", {})["process_wall"] = wall_s
        phase_path.unlink(missing_ok=True)  # kept only where a job ended without its result
        provisional.unlink(missing_ok=True)
        return result
    elif returncode < 0:
        error = f"cell process died with signal {signal.Signals(-returncode).name}"
    else:
        error = f"cell process exited with code {returncode} and no result"
    error += job_phase.describe(phase_path)  # what it was doing: the job cannot say so itself
    tail = _tail(log_path)
    error += f"\n{tail}" if tail else ""
    kept = _provisional_result(provisional, error, wall_s)
    if kept is not None:
        return kept
    return {"status": "failed", "error": error, "timing_s": {"process_wall": wall_s}}


def _provisional_result(path: Path, error: str, wall_s: float) -> dict[str, Any] | None:
    """The record a cell kept before scoring drift, with the drift failed by ``error``; None where it kept none.

    Its speed and memory figures were complete when it was written; only drift, which the job
    did not finish (a timeout, a crash), is missing, and ``drift_error`` says why, as it does
    for drift that raised. The drift's wall time is from the record's writing to the job's end.
    """
    try:
        result = json.loads(path.read_text())
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return None
    timing = result.setdefault("timing_s", {})
    drift_s = max(0.0, time.time() - written)
    timing.update(process_wall=wall_s, drift=drift_s, total=timing.get("total", 0.0) + drift_s)
    result.update(drift_ok=False, drift_error=error)
    return result


def kill_group(proc) -> None:
    """SIGKILL the process group ``proc`` leads (a job's, a git's started in a session of its own): its
    helpers go too.
    """
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # no group yet (killed before its setsid): the process itself
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cell_result_to_record(cell, result: dict[str, Any]) -> dict[str, Any]:
    """A cell's record from its job output: the child's own record, or a failed one from the parent."""
    if "cell_id" in result:
        record = result
    else:
        record = failed_record(cell, result["error"])
        record["timing_s"].update(result.get("timing_s", {}))
        record["method"].update(result.get("method", {}))
    timing = record["timing_s"]
    if "process_wall" in timing and "measure" in timing:
        # Harness overhead: everything the cell process did besides the measured repetitions.
        timing["harness_overhead"] = timing["process_wall"] - timing["measure"]
    return record
