"""Run jobs as Ray tasks: on a local Ray instance by default, or an existing cluster.

Each task runs the same isolated job as the local launcher (a fresh process per cell) on
whichever node Ray places it, and returns the record to the driver, which appends it to
the run directory as it arrives, so resume guarantees are the same. CUDA cells ask for
one GPU; CPU cells ask for every CPU of a node, so two measured cells never share a
machine's cores.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optimize.errors import InputError


def _run_remote(kind: str, spec: dict[str, Any], timeout_s: float, cwd: str) -> dict[str, Any]:
    from bench.runner import run_job

    if os.path.isdir(cwd):
        os.chdir(cwd)  # same relative paths as the driver when the node shares its filesystem
    with tempfile.TemporaryDirectory(prefix="infermatrix-") as tmp:
        return run_job(kind, spec, Path(tmp), timeout_s)


CONNECT_TIMEOUT_S = 60.0

# the connection a run makes, in a child that can be killed: ray.init retries a silent address forever
_PROBE = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
except Exception as exc:
    print(" ".join(f"{type(exc).__name__}: {exc}".split()), flush=True)
    sys.exit(1)
ray.shutdown()
"""


def check_address(address: str | None, label: str = "--ray-address", timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a cluster address that no Ray cluster answers at, before anything is written.

    ``ray.init`` retries a GCS it cannot reach forever, inside native code that Ctrl-C does not
    interrupt. A ``host:port`` (or ``ray://host:port``) is first tried with a TCP connection (a refused
    or unroutable address fails in seconds); then a child process connects as the run will, and is
    killed after ``timeout_s`` (a port that listens but is no Ray cluster's: the dashboard's, say).
    ``None``, ``auto`` and ``local`` are Ray's own to resolve, and fail fast where no cluster runs.
    """
    if importlib.util.find_spec("ray") is None:
        raise InputError("--launcher ray needs Ray: pip install 'infermatrix[ray]'")
    if not address or address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    host, colon, port = (rest if sep else address).rpartition(":")
    if (not sep or scheme == "ray") and colon and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 10.0)).close()
        except OSError as exc:
            raise InputError(f"{label} {address}: no Ray cluster there ({exc.strerror or exc})") from None
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                               timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"{label} {address}: no Ray cluster answered within {timeout_s:g} s "
                         "(a Ray cluster's address is its GCS port, 6379 unless started with another)") from None
    if probe.returncode != 0:
        lines = (probe.stdout or probe.stderr).strip().splitlines()
        raise InputError(f"{label} {address}: Ray could not connect: {lines[-1] if lines else probe.returncode}")


class RayNodesWarning(UserWarning):
    """What the cluster's nodes mean for the cells: nodes too small for a CPU cell, no GPU for a CUDA one."""


def node_cpus(nodes: list[dict[str, Any]]) -> int:
    """The CPUs a CPU cell asks for: every CPU of the largest live node (``ray.nodes()``).

    Not the cluster's total (``available_resources``), which no single node has where there
    are several: Ray would hold every CPU cell as infeasible, and the run would wait forever.
    Where nodes differ, those with fewer CPUs run no CPU cell (two cells must never share a
    node's cores), and a warning says so.
    """
    counts = {node.get("NodeManagerAddress") or str(k): int((node.get("Resources") or {}).get("CPU", 0))
              for k, node in enumerate(nodes) if node.get("Alive", True)}
    counts = {name: n for name, n in counts.items() if n > 0}
    if not counts:
        return 1
    largest = max(counts.values())
    smaller = sorted(name for name, n in counts.items() if n < largest)
    if smaller:
        warnings.warn(RayNodesWarning(
            f"Ray nodes differ in CPUs ({', '.join(f'{name}: {n}' for name, n in sorted(counts.items()))}): "
            f"a CPU cell asks for {largest}, every CPU of the largest node, so {', '.join(smaller)} run no CPU cell"),
            stacklevel=2)
    return largest


def gpu_cell_cpus(nodes: list[dict[str, Any]]) -> int | None:
    """The CPUs a CUDA cell asks for beside its GPU: its node's CPUs shared equally among the node's
    GPUs (the smallest such share of any live GPU node), so that cells on one multi-GPU node never
    crowd one another's launch threads; None where no live node has a GPU.
    """
    shares = [int(res.get("CPU", 0)) // int(res["GPU"]) for node in nodes if node.get("Alive", True)
              for res in [node.get("Resources") or {}] if int(res.get("GPU", 0)) > 0]
    return max(1, min(shares)) if shares else None


class RayLauncher:
    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_cell: int | None = None):
        try:
            import ray
        except ImportError:
            raise InputError("--launcher ray needs Ray: pip install 'infermatrix[ray]'") from None
        self._ray = ray
        address = address or os.environ.get("RAY_ADDRESS")  # Ray's own variable, as ray.init reads it
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count())
        nodes = ray.nodes()
        self.cpus_per_cell = cpus_per_cell or node_cpus(nodes)
        self.cpus_per_gpu_cell = gpu_cell_cpus(nodes)
        self._task = ray.remote(_run_remote)

    def _options(self, spec: dict[str, Any]) -> dict[str, Any]:
        if spec.get("device") == "cuda":
            return {"num_gpus": 1, "num_cpus": self.cpus_per_gpu_cell or 1}
        return {"num_cpus": self.cpus_per_cell}

    def run(self, jobs: list[tuple[str, dict[str, Any], float]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Submit every job, then yield ``(spec, result)`` in completion order (``ray.wait`` blocks)."""
        ray = self._ray
        pending = {}
        if self.cpus_per_gpu_cell is None and any(spec.get("device") == "cuda" for _, spec, _ in jobs):
            # An autoscaling cluster starts a GPU node for the waiting tasks; a fixed one never will.
            warnings.warn(RayNodesWarning("no live Ray node has a GPU: the CUDA jobs wait until one joins the "
                                          "cluster (Ray reports them infeasible until then)"), stacklevel=2)
        # a cell's threads are in its measure settings, a ceiling job's at the top of its spec
        threads = max((int((spec.get("measure") or {}).get("threads") or spec.get("threads") or 0)
                       for _, spec, _ in jobs if spec.get("device") != "cuda"), default=0)
        if threads > self.cpus_per_cell:
            warnings.warn(RayNodesWarning(
                f"threads {threads} is more than the {self.cpus_per_cell} CPUs a CPU job asks for: its threads "
                "share cores, and its figures time that contention"), stacklevel=2)
        for kind, spec, timeout_s in jobs:
            ref = self._task.options(**self._options(spec)).remote(kind, spec, timeout_s, os.getcwd())
            pending[ref] = spec
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task itself died (node lost, worker crash)
                    result = {"status": "failed", "error": f"ray task failed: {type(exc).__name__}: {exc}"}
                yield spec, result

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()
