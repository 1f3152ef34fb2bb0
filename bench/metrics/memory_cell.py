"""Memory inside a cell: the load's peaks, the whole cell's and the serving window's, and how each was taken.

The load window is closed (its peaks read, then reset) before the scenario runs, so the serving
figures hold only warm-up and repetitions; every figure is read before drift is scored.
"""

from __future__ import annotations

from typing import Any

from bench.metrics import memory

_METHOD = {
    "cuda": "cuda max_memory_allocated over the cell (load included), and over warm-up and repetitions alone "
            "(serving, after a second reset); NVML per process",
    "cpu": "peak RSS of the cell process (getrusage; load included) and its increase over pre-load RSS, read with the "
           "fork server's resident library pages resident again; serving: VmHWM over warm-up and repetitions alone, "
           "after a /proc/self/clear_refs reset",
}
_NO_SERVING_WINDOW = "; serving peak not measured: /proc/self/clear_refs cannot reset the peak here"


def memory_method(device: str, metrics: dict[str, Any]) -> str:
    """How the cell's memory figures were taken, in the words ``compare`` reads (``method.memory``)."""
    return _METHOD["cuda" if device == "cuda" else "cpu"] + \
        ("" if "serving_peak_memory_bytes" in metrics else _NO_SERVING_WINDOW)


def close_load_window(device: str) -> dict[str, Any]:
    """The load's memory peaks; then the peaks are reset, so that the run's own can be read after it.

    Returns the load's figures; on the CPU also ``reset``, False where the peak RSS cannot be
    reset (the cell then has no serving figure, only the whole cell's peak).
    """
    if device == "cuda":
        load = memory.cuda_peaks()
        memory.reset_cuda_peaks()
        return load
    return {"peak_rss_bytes": memory.peak_rss_bytes(), "reset": memory.reset_peak_rss()}


def measure_memory(device: str, baseline_rss: int, load: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Peak memory of the whole cell so far (load included), of its load, and of the run alone (serving).

    CUDA: allocator and NVML figures, the host's peak RSS beside them; CPU: the process's RSS.
    With them, ``method`` entries saying why a figure is missing (``nvml``): apart from
    ``method.memory``, whose words ``compare`` reads as how the gated figures were taken.
    """
    if device == "cuda":
        run, nvml_missing = memory.cuda_memory()
        allocated, reserved = "cuda_max_allocated_bytes", "cuda_max_reserved_bytes"
        peaks = {key: max(load[key], run[key]) for key in (allocated, reserved)}
        return {**run, **peaks, "peak_memory_bytes": peaks[allocated], "load_peak_memory_bytes": load[allocated],
                "serving_peak_memory_bytes": run[allocated], "host_peak_rss_bytes": memory.peak_rss_bytes()}, \
            {} if nvml_missing is None else {"nvml": f"no per-process figure: {nvml_missing}"}
    serving = memory.vm_hwm_bytes() if load["reset"] else None
    # The reset restarted getrusage's peak too; VmHWM and getrusage may differ by a few pages.
    peak = max(load["peak_rss_bytes"], memory.peak_rss_bytes(), serving or 0)
    out = {"peak_memory_bytes": peak, "rss_increase_bytes": peak - baseline_rss,
           "load_peak_memory_bytes": load["peak_rss_bytes"]}
    if serving is not None:
        out["serving_peak_memory_bytes"] = serving
    return out, {}


def onnx_runtime_cuda_memory(metrics: dict[str, Any]) -> str:
    """An ONNX Runtime cell's device memory on CUDA, in place in ``metrics``; the method's text for it.

    ONNX Runtime keeps its weights and activations in its own CUDA arena, which torch's allocator
    does not see (it holds only the I/O-bound inputs and outputs): the allocator's peak alone would
    leave the model out. NVML's figure for the process covers the arena (and the CUDA context);
    without one, the figure is a lower bound, the allocator's peak plus the graph's weights.
    """
    nvml = metrics.get("nvml_process_bytes")
    if nvml is not None:
        serving = max(nvml, metrics["serving_peak_memory_bytes"])
        metrics.update(serving_peak_memory_bytes=serving, peak_memory_bytes=max(serving, metrics["peak_memory_bytes"]))
        return ("NVML device memory of the cell process after warm-up and repetitions (ONNX Runtime's CUDA arena is "
                "outside torch's allocator; the CUDA context included); load: torch's allocator only")
    for key in ("peak_memory_bytes", "serving_peak_memory_bytes"):
        metrics[key] += metrics["weights_bytes"]
    return ("a lower bound: torch's allocator peak (the I/O-bound inputs and outputs) plus the graph's weight bytes "
            "(ONNX Runtime's CUDA arena is outside torch's allocator, and NVML had no figure: see method.nvml)")
