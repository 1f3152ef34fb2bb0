"""Memory figures: process RSS on the CPU, allocator peaks and NVML on CUDA, weight bytes."""

from __future__ import annotations

import os
import resource
from typing import Any

from optimize.errors import exception_line


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int | None:
    """Peak RSS of this process since it started or since ``reset_peak_rss`` (``VmHWM``); None without it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; False where that cannot be done.

    Linux (4.0+) resets ``VmHWM`` (and getrusage's ``ru_maxrss``) to the current RSS when ``5``
    is written to ``/proc/self/clear_refs``; other systems and some sandboxes refuse it, and the
    caller then has no window of its own.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return vm_hwm_bytes() is not None


def reset_cuda_peaks() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def cuda_peaks() -> dict[str, int]:
    """The caching allocator's peaks since the last reset."""
    import torch

    torch.cuda.synchronize()
    return {"cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "cuda_max_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def cuda_memory() -> tuple[dict[str, int | None], str | None]:
    """Allocator peaks since the last reset, and this process's device memory from NVML; why NVML had none."""
    used, why_not = nvml_process_memory()
    return {**cuda_peaks(), "nvml_process_bytes": used}, why_not


def nvml_process_memory() -> tuple[int | None, str | None]:
    """Device memory NVML attributes to this process (the CUDA context included), or None and why not.

    The device is found by its UUID (torch's, which NVML knows whatever ``CUDA_VISIBLE_DEVICES``
    says), else by the index ``CUDA_VISIBLE_DEVICES`` maps torch's device to. NVML lists processes
    by their PIDs in the host's namespace: in a container the process is then not found.
    """
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver library, or not permitted
        return None, f"NVML did not start ({exception_line(exc)})"
    try:
        handle = _nvml_handle(pynvml)
        listed = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        for proc in listed:
            if proc.pid == os.getpid():
                if proc.usedGpuMemory is None:
                    return None, "NVML lists this process without its memory (not permitted here)"
                return int(proc.usedGpuMemory), None
        return None, (f"NVML lists {len(listed)} process(es) on the device, none with this process's PID "
                      f"{os.getpid()} (a container's PIDs are not the host's)")
    except Exception as exc:
        return None, f"NVML could not read the device's processes ({exception_line(exc)})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001  (nothing to report: the figure is read)
            pass


def _nvml_handle(pynvml):
    """NVML's handle of torch's current device: by UUID where NVML knows it, else by the visible index."""
    import torch

    index = torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001  (older torch: no uuid; the index below)
        uuid = ""
    bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
    # NVML's spellings: GPU-<uuid> for a whole GPU, MIG-<uuid> for a MIG instance (torch reports either bare)
    for name in dict.fromkeys(filter(None, [f"GPU-{bare}", f"MIG-{bare}", uuid] if uuid else [])):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:  # noqa: BLE001  (not this spelling)
            continue
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        entry = visible[index]
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else \
            pynvml.nvmlDeviceGetHandleByUUID(entry)  # GPU-... or MIG-...
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor, recursing into wrapper subclasses (torchao) that hold inner tensors."""
    if hasattr(t, "__tensor_flatten__"):  # plain tensors and parameters have no __tensor_flatten__
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _state_items(obj: Any):
    """Tensors in a state dict value; packed int8 params come as tuples of tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _state_items(item)


def torch_weights_bytes(model) -> int:
    """Bytes of every distinct tensor in the model's state dict (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for value in model.state_dict().values():
        for t in _state_items(value):
            key = id(t) if t.is_quantized or hasattr(t, "__tensor_flatten__") else t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += tensor_bytes(t)
    return total


def weights_bytes(state) -> int:
    if state.backend == "onnxruntime":
        from optimize.export.onnx import onnx_bytes

        return onnx_bytes(state.onnx_dir)  # the graph files: the weights are their bulk
    return torch_weights_bytes(state.model)


def kv_bytes_per_token(config, element_bytes: float) -> float:
    """KV cache bytes per token of context: 2 (K and V) x layers x KV heads x head dim x element bytes."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * element_bytes


def untied_embedding_bytes(state, manifest: dict | None = None) -> int:
    """Bytes of an input embedding table that is not also the LM head.

    Decode reads one row of it per token, not the whole table, so bandwidth estimates
    subtract it from the weight bytes. Tied tables are read in full by the LM head. For an
    ONNX graph the figure comes from the stored artifact's ``manifest``, recorded when it was
    built; artifacts built before that are parsed here.

    Raises:
        LookupError: an ONNX graph whose ``Gather`` on ``input_ids`` reads no initializer
            (directly or through ``DequantizeLinear``), so the table's size is unknown.

    """
    config = state.model.config
    if getattr(config, "tie_word_embeddings", False):
        return 0
    if state.backend != "onnxruntime":
        return tensor_bytes(state.model.get_input_embeddings().weight)
    from optimize.export.onnx import EMBEDDING_BYTES, EMBEDDING_ERROR, embedding_table_bytes

    if manifest and EMBEDDING_BYTES in manifest:
        if manifest[EMBEDDING_BYTES] is None:
            raise LookupError(manifest[EMBEDDING_ERROR])
        return manifest[EMBEDDING_BYTES]
    return embedding_table_bytes(state.onnx_dir)
