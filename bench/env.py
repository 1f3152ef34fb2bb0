"""The environment record: machine, accelerator, libraries and source revision."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from optimize.libraries import libraries
from optimize.store import library_versions

LIBRARIES = libraries()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_tile, ...) as /proc/cpuinfo lists them; [] elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def git_info(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout holding ``path`` (default: this package's source tree)."""
    root = Path(path).resolve() if path else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def gpu_info() -> tuple[list[dict[str, Any]], str]:
    """The GPUs NVML lists, and how that list was obtained.

    The second item tells an empty list apart: ``"nvml"`` (NVML answered), ``"no NVIDIA driver: ..."``
    (no NVML library or driver on this machine, so no NVIDIA GPU) or ``"nvml failed: ..."`` (NVML is
    there but failed, so the list says nothing about the GPUs present).
    """
    try:
        import pynvml
    except ImportError as exc:
        return [], f"nvml failed: pynvml not importable ({exc})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if exc.value in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
            return [], f"no NVIDIA driver: {exc}"
        return [], f"nvml failed: {type(exc).__name__}: {exc}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append({
                "index": i,
                "name": pynvml.nvmlDeviceGetName(h),
                "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                "driver": driver,
                "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}",
            })
        return gpus, "nvml"
    except pynvml.NVMLError as exc:
        return [], f"nvml failed: {type(exc).__name__}: {exc}"
    finally:
        pynvml.nvmlShutdown()


def user_repository(where: Path | None = None) -> dict[str, Any]:
    """Provenance of what is benchmarked: the git checkout of the matrix file, or of the working directory."""
    where = Path(where).resolve() if where else Path.cwd()
    folder = where if where.is_dir() else where.parent
    return {"path": str(folder), **git_info(folder)}


RECORDED_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE")


def recorded_env_vars() -> dict[str, str]:
    """The environment variables a run records (those set, of ``RECORDED_ENV_VARS``)."""
    return {k: os.environ[k] for k in RECORDED_ENV_VARS if k in os.environ}


def environment(with_torch: bool = True, user_path: Path | None = None) -> dict[str, Any]:
    """The machine, libraries and both revisions: the harness's own and the user's repository's.

    Args:
        with_torch: ask torch about devices here (imports torch).
        user_path: the matrix file or directory whose repository the run belongs to (default: cwd).

    """
    import psutil

    env = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_compiler": platform.python_compiler(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": psutil.virtual_memory().total,
        "libraries": library_versions(LIBRARIES),
        "git": git_info(),  # the harness's own checkout (None for an installed package)
        "harness_version": library_versions(("infermatrix",)).get("infermatrix"),
        "user_repository": user_repository(user_path),
        "env_vars": recorded_env_vars(),
    }
    env["gpus"], env["gpus_source"] = gpu_info()
    if with_torch:
        env["torch"] = torch_info()
    return env


def torch_info() -> dict[str, Any]:
    import torch

    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def device_resolver(torch_env: dict[str, Any]):
    """``resolve_device`` for the parent, from a probe's answer: auto -> cuda when torch sees a GPU."""
    from optimize.errors import InputError

    def resolve(device: str) -> str:
        if device == "cuda" and not torch_env["cuda_available"]:
            raise InputError("--device cuda asked for, but torch sees no CUDA device")
        return "cuda" if device == "auto" and torch_env["cuda_available"] else ("cpu" if device == "auto" else device)

    return resolve
