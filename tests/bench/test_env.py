"""The environment record tells "no NVIDIA driver" apart from "NVML failed"."""

from __future__ import annotations

import pytest

pynvml = pytest.importorskip("pynvml")

from bench.env import device_resolver, environment, gpu_info  # noqa: E402
from optimize.errors import InputError  # noqa: E402


def _init_raising(code):
    def init():
        raise pynvml.NVMLError(code)
    return init


def test_missing_nvml_library_means_no_driver(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _init_raising(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    gpus, source = gpu_info()
    assert gpus == [] and source == "no NVIDIA driver: NVML Shared Library Not Found"


def test_nvml_failure_is_recorded_as_a_failure_not_as_no_gpus(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _init_raising(pynvml.NVML_ERROR_NO_PERMISSION))
    gpus, source = gpu_info()
    assert gpus == [] and source == "nvml failed: NVMLError_NoPermission: Insufficient Permissions"
    env = environment(with_torch=False)
    assert env["gpus"] == [] and env["gpus_source"] == source


def test_nvml_failing_while_listing_devices_is_recorded_and_shuts_nvml_down(monkeypatch):
    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.1")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 13000)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", _init_raising(pynvml.NVML_ERROR_GPU_IS_LOST))
    assert gpu_info() == ([], "nvml failed: NVMLError_GpuIsLost: GPU is lost")
    assert calls == ["init", "shutdown"]


def test_gpus_listed_by_nvml(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.1")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 12040)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"h{i}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H200")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: type("M", (), {"total": 2**30})())
    assert gpu_info() == ([{"index": 0, "name": "NVIDIA H200", "memory_bytes": 2**30, "driver": "580.1",
                            "cuda_driver_version": "12.4"}], "nvml")


def test_device_resolver_maps_auto_and_refuses_missing_cuda():
    with_gpu, without = device_resolver({"cuda_available": True}), device_resolver({"cuda_available": False})
    assert (with_gpu("auto"), with_gpu("cpu"), with_gpu("cuda")) == ("cuda", "cpu", "cuda")
    assert (without("auto"), without("cpu")) == ("cpu", "cpu")
    with pytest.raises(InputError, match="--device cuda asked for, but torch sees no CUDA device"):
        without("cuda")
