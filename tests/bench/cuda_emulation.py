"""Make a CPU build of torch look like a CUDA host, and record whatever would initialise CUDA.

Importing ``tests.bench.emulate_cuda`` (before anything else imports torch's CUDA users)
installs the emulation in the current process; ``tests/bench/test_cuda_emulated.py`` does so
in fresh interpreters and in fork-server preloads. What it emulates, as torch 2.x on a GPU host:

- ``torch.version.cuda`` is set and ``torch.cuda.is_available()`` is true; availability is
  answered by torch's own code, so it goes through ``torch._C._cuda_getDeviceCount`` (the
  CUDA runtime's ``cudaGetDeviceCount``, which runs ``cuInit``: recorded) unless
  ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` asks for NVML (not recorded: no driver context).
- ``torch.cuda._lazy_init`` (and every public call that goes through it: device
  properties, capability, name, ``current_device``, ``set_device``, ``synchronize``, ...) is
  recorded and marks the process initialised; a process forked from an initialised one is
  "in a bad fork" and its first initialisation raises torch's own error.
- ``torch._C._cuda_*`` symbols a CPU build lacks (``_cuda_getCurrentRawStream``, imported by
  ``torch._dynamo``, ...) are stood in for by functions that record the call (any of them
  would talk to the driver).

With ``INFERMATRIX_TEST_CUDA_POISON=1`` that import also initialises CUDA when imported, as
a library that queries the device at import time does (torchao 0.18).

Each recorded call is appended as one JSON line (pid, name, stack) to the file named by
``INFERMATRIX_TEST_CUDA_LOG`` when that is set (so forked and spawned children report
too), and kept in ``CALLS``.
"""

from __future__ import annotations

import json
import os
import traceback
from types import SimpleNamespace

import torch

LOG_ENV = "INFERMATRIX_TEST_CUDA_LOG"
CAPABILITY = (9, 0)
CALLS: list[dict] = []
_init_pid: list[int] = []  # the pid that initialised CUDA, if any (inherited across fork)

PROPERTIES = SimpleNamespace(name="Emulated H200", major=CAPABILITY[0], minor=CAPABILITY[1],
                             total_memory=141 * 2**30, multi_processor_count=132, L2_cache_size=60 * 2**20,
                             gcnArchName="", uuid="emulated", is_integrated=False, warp_size=32)


def record(name: str) -> None:
    entry = {"pid": os.getpid(), "name": name, "stack": "".join(traceback.format_stack()[:-2])}
    CALLS.append(entry)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def read_log(path) -> list[dict]:
    """Every call recorded under ``path`` by any process."""
    try:
        return [json.loads(line) for line in open(path).read().splitlines() if line]
    except FileNotFoundError:
        return []


def _in_bad_fork() -> bool:
    return bool(_init_pid) and _init_pid[0] != os.getpid()


def _lazy_init() -> None:
    if _init_pid and _init_pid[0] == os.getpid():
        return
    if _in_bad_fork():
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, "
                           "you must use the 'spawn' start method")
    record("torch.cuda._lazy_init")
    _init_pid[:] = [os.getpid()]


def _initialising(name: str, result=None):
    def call(*args, **kwargs):
        record(name)
        _lazy_init()
        return result
    call.__name__ = name.rsplit(".", 1)[-1]
    return call


def _device_count_runtime() -> int:
    record("torch._C._cuda_getDeviceCount (cudaGetDeviceCount: cuInit)")
    return 1


def _missing_cuda_symbol(name: str):
    # PEP 562 hook on torch._C: only the CUDA entry points a CPU build lacks are stood in for.
    if name.startswith("_cuda_") or name.startswith("_cudart"):
        return _initialising(f"torch._C.{name}")
    raise AttributeError(f"module 'torch._C' has no attribute {name!r}")


def install() -> None:
    """Install the emulation in this process (idempotent)."""
    if getattr(torch.cuda, "_infermatrix_emulated", False):
        return
    cuda = torch.cuda
    torch.version.cuda = "13.0"
    torch._C._cuda_getDeviceCount = _device_count_runtime
    torch._C.__getattr__ = _missing_cuda_symbol
    cuda._device_count_nvml = lambda: 1  # NVML answers without a driver context
    cuda._is_in_bad_fork = _in_bad_fork
    cuda.is_initialized = lambda: bool(_init_pid) and not _in_bad_fork()
    cuda._lazy_init = _lazy_init
    cuda.init = _lazy_init
    cuda.get_device_properties = _initialising("torch.cuda.get_device_properties", PROPERTIES)
    cuda.current_device = _initialising("torch.cuda.current_device", 0)
    cuda.set_device = _initialising("torch.cuda.set_device")
    cuda.synchronize = _initialising("torch.cuda.synchronize")
    cuda.mem_get_info = _initialising("torch.cuda.mem_get_info", (100 * 2**30, PROPERTIES.total_memory))
    # get_device_capability / get_device_name stay torch's own: they call get_device_properties.
    cuda._infermatrix_emulated = True

