"""Memory figures: weight bytes, KV bytes per token, the untied embedding table, against hand counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.metrics import memory


def _config(**fields):
    base = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 128}
    return SimpleNamespace(**{**base, **fields})


def test_kv_bytes_per_token_by_hand():
    # 2 (K, V) x 2 layers x 2 KV heads x head dim 32 x 2 bytes
    assert memory.kv_bytes_per_token(_config(num_key_value_heads=2, head_dim=32), 2) == 2 * 2 * 2 * 32 * 2
    # no GQA field: every query head has its K and V; head dim from hidden / heads = 32
    assert memory.kv_bytes_per_token(_config(), 4) == 2 * 2 * 4 * 32 * 4
    assert memory.kv_bytes_per_token(_config(num_key_value_heads=1, head_dim=64), 0.5) == 2 * 2 * 1 * 64 * 0.5


def test_weights_bytes_count_tied_tables_once_and_every_dtype_at_its_size():
    torch = pytest.importorskip("torch")
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)  # 40 fp32 = 160 bytes
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied: counted once
    model.half = torch.nn.Linear(4, 3).to(torch.float16)  # 12 + 3 fp16 = 30 bytes
    model.register_buffer("steps", torch.zeros(5, dtype=torch.int64))  # 40 bytes
    assert memory.torch_weights_bytes(model) == 160 + 30 + 40
    assert memory.tensor_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30


def _torch_state(tied: bool):
    torch = pytest.importorskip("torch")
    model = torch.nn.Module()
    model.config = SimpleNamespace(tie_word_embeddings=tied)
    table = torch.nn.Embedding(100, 8)
    model.get_input_embeddings = lambda: table
    return SimpleNamespace(model=model, backend="torch")


def test_untied_embedding_bytes_on_torch():
    assert memory.untied_embedding_bytes(_torch_state(tied=False)) == 100 * 8 * 4
    assert memory.untied_embedding_bytes(_torch_state(tied=True)) == 0  # the LM head reads all of it


def _onnx_state(tmp_path, nodes, initializers):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=initializers)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=False)),
                           backend="onnxruntime", onnx_dir=str(tmp_path))


def test_untied_embedding_bytes_reads_the_gathered_initializer(tmp_path):
    pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((50, 6), dtype=np.float32), "embed.weight")
    other = numpy_helper.from_array(np.zeros((7, 7), dtype=np.float32), "other")
    nodes = [helper.make_node("Gather", ["other", "input_ids"], ["x"]),  # a gather not reading the table first
             helper.make_node("Gather", ["embed.weight", "input_ids"], ["out"])]
    nodes[0].input[1] = "positions"  # only a Gather on input_ids is the embedding lookup
    assert memory.untied_embedding_bytes(_onnx_state(tmp_path, nodes, [other, table])) == 50 * 6 * 4


def test_untied_embedding_bytes_follows_dequantize_to_the_int8_table(tmp_path):
    pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((50, 6), dtype=np.uint8), "embed_q"),
             numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.array(0, dtype=np.uint8), "zero")]
    nodes = [helper.make_node("DequantizeLinear", ["embed_q", "scale", "zero"], ["embed"]),
             helper.make_node("Gather", ["embed", "input_ids"], ["out"])]
    assert memory.untied_embedding_bytes(_onnx_state(tmp_path, nodes, inits)) == 50 * 6 * 1


def test_untied_embedding_not_found_in_onnx_is_an_error_not_zero(tmp_path):
    pytest.importorskip("onnx")
    from onnx import helper

    nodes = [helper.make_node("Identity", ["input_ids"], ["out"])]
    with pytest.raises(LookupError, match=r"no embedding table found in .*model.onnx: no Gather on input_ids "
                                          r"reads an initializer \(directly or through DequantizeLinear\)$"):
        memory.untied_embedding_bytes(_onnx_state(tmp_path, nodes, []))


def test_an_onnx_table_size_kept_in_the_manifest_is_used_without_parsing_the_graph(tmp_path, monkeypatch):
    """Cells pass the stored artifact's manifest: the graph, weights and all, is parsed once at build time."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    from optimize.export.onnx import EMBEDDING_BYTES, EMBEDDING_ERROR, embedding_facts

    table = numpy_helper.from_array(np.zeros((50, 6), dtype=np.float32), "embed.weight")
    state = _onnx_state(tmp_path, [helper.make_node("Gather", ["embed.weight", "input_ids"], ["out"])], [table])
    facts = embedding_facts(state.onnx_dir)  # what the store writes into the manifest
    assert facts == {EMBEDDING_BYTES: 50 * 6 * 4}

    def no_parse(*args, **kwargs):
        raise AssertionError("the graph was parsed")

    monkeypatch.setattr(onnx, "load", no_parse)
    assert memory.untied_embedding_bytes(state, {**facts, "backend": "onnxruntime"}) == 50 * 6 * 4
    assert memory.untied_embedding_bytes(state, {EMBEDDING_BYTES: 123}) == 123  # the manifest's figure, as kept
    with pytest.raises(LookupError, match="^no table in this graph$"):  # none found at build time: the reason
        memory.untied_embedding_bytes(state, {EMBEDDING_BYTES: None, EMBEDDING_ERROR: "no table in this graph"})
    with pytest.raises(AssertionError, match="parsed"):  # an artifact built before the manifest kept the size
        memory.untied_embedding_bytes(state, {"backend": "onnxruntime"})


def test_a_graph_without_a_table_is_kept_in_the_manifest_as_unknown_with_the_reason(tmp_path):
    pytest.importorskip("onnx")
    from onnx import helper

    from optimize.export.onnx import EMBEDDING_BYTES, EMBEDDING_ERROR, embedding_facts

    state = _onnx_state(tmp_path, [helper.make_node("Identity", ["input_ids"], ["out"])], [])
    facts = embedding_facts(state.onnx_dir)
    assert facts[EMBEDDING_BYTES] is None and facts[EMBEDDING_ERROR].startswith("no embedding table found in ")
    with pytest.raises(LookupError) as exc:
        memory.untied_embedding_bytes(state, facts)
    assert str(exc.value) == facts[EMBEDDING_ERROR]


def test_untied_embedding_bytes_without_a_tie_setting_counts_the_table():
    torch = pytest.importorskip("torch")
    table = torch.nn.Embedding(100, 8)
    model = SimpleNamespace(config=SimpleNamespace(), get_input_embeddings=lambda: table)  # no tie_word_embeddings
    assert memory.untied_embedding_bytes(SimpleNamespace(model=model, backend="torch")) == 100 * 8 * 4


def test_untied_embedding_bytes_reads_the_graph_without_its_weight_files(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((64, 32), dtype=np.float32), "embed")
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["out"])]
    state = _onnx_state(tmp_path, nodes, [table])
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    (tmp_path / "weights.bin").unlink()  # sizes come from the graph's dims: the weights are never read
    assert memory.untied_embedding_bytes(state) == 64 * 32 * 4


def test_peak_rss_is_at_least_the_current_rss():
    import psutil

    peak, now = memory.peak_rss_bytes(), psutil.Process().memory_info().rss
    assert memory.rss_bytes() > 0 and peak >= now * 0.99  # ru_maxrss is in KiB: allow its rounding


def test_vm_hwm_reads_the_kernels_peak_in_bytes(monkeypatch):
    import io

    text = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n"
    opened = []
    monkeypatch.setattr(memory, "open", lambda path, mode="r": opened.append(path) or io.StringIO(text),
                        raising=False)
    assert memory.vm_hwm_bytes() == 123456 * 1024
    assert opened == ["/proc/self/status"]
    monkeypatch.setattr(memory, "open", lambda path, mode="r": io.StringIO("Name:\tpython\n"), raising=False)
    assert memory.vm_hwm_bytes() is None  # a kernel without the field
    monkeypatch.setattr(memory, "open", lambda path, mode="r": io.StringIO("VmHWM:\n"), raising=False)
    assert memory.vm_hwm_bytes() is None


def test_vm_hwm_is_none_without_proc(monkeypatch):
    def missing(path, mode="r"):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory, "open", missing, raising=False)
    assert memory.vm_hwm_bytes() is None
    assert memory.reset_peak_rss() is False


def test_reset_peak_rss_writes_5_to_clear_refs_and_starts_a_new_window(peak_rss_resets):
    """The real kernel: after a reset the peak is the current RSS, not an earlier high-water mark."""
    import numpy as np

    held = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del held
    before = memory.vm_hwm_bytes()
    assert memory.reset_peak_rss() is True
    after, now = memory.vm_hwm_bytes(), memory.rss_bytes()
    assert after <= before - 48 * 2**20 and abs(after - now) < 8 * 2**20
    assert abs(memory.peak_rss_bytes() - after) < 8 * 2**20  # getrusage's peak was reset with it


def test_reset_peak_rss_is_false_where_the_write_is_refused(monkeypatch):
    written = []

    class Refused:
        def __init__(self, path, mode="r"):
            written.append((path, mode))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            written.append(text)
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(memory, "open", Refused, raising=False)
    assert memory.reset_peak_rss() is False
    assert written == [("/proc/self/clear_refs", "w"), "5"]


def test_nvml_process_bytes_is_none_when_nvml_fails(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert memory.nvml_process_memory() == (None, "NVML did not start (NVMLError_DriverNotLoaded: Driver Not Loaded)")


def test_peak_rss_converts_linux_kib_to_bytes(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=1000))
    assert memory.peak_rss_bytes() == 1000 * 1024


def test_kv_head_dim_is_an_integer_division():
    # hidden 130 over 4 heads: head_dim 32 (as Llama computes it), not 32.5
    assert memory.kv_bytes_per_token(_config(hidden_size=130), 1) == 2 * 2 * 4 * 32


def test_weights_bytes_count_packed_tuples_and_wrapper_tensors():
    torch = pytest.importorskip("torch")

    class Wrapper:  # a tensor subclass holding inner tensors, as torchao's quantized weights do
        def __init__(self):
            self.qdata = torch.zeros(8, dtype=torch.int8)
            self.scale = torch.zeros(2, dtype=torch.float32)

        def __tensor_flatten__(self):
            return ["qdata", "scale"], None

    assert memory.tensor_bytes(Wrapper()) == 8 + 8
    packed = (torch.zeros(4, dtype=torch.int8), [torch.zeros(3, dtype=torch.float32)])
    model = SimpleNamespace(state_dict=lambda: {"w": torch.zeros(2, 2), "packed": packed, "dtype": "qint8"})
    assert memory.torch_weights_bytes(model) == 16 + 4 + 12


def test_weights_bytes_key_wrappers_and_quantized_tensors_by_object_and_count_past_a_duplicate():
    torch = pytest.importorskip("torch")

    class Wrapper(torch.Tensor):  # made as torchao's Int8Tensor is: inner tensors, no storage of its own
        @staticmethod
        def __new__(cls, n):
            return torch.Tensor._make_wrapper_subclass(cls, (n,), dtype=torch.int8)

        def __init__(self, n):
            self.qdata = torch.zeros(n, dtype=torch.int8)
            self.scale = torch.zeros(1, dtype=torch.float32)

        def __tensor_flatten__(self):
            return ["qdata", "scale"], None

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(func)

    a, b = Wrapper(16), Wrapper(32)
    q1 = torch.quantize_per_tensor(torch.ones(8), 0.1, 0, torch.qint8)
    q2 = torch.quantize_per_tensor(torch.ones(6), 0.1, 0, torch.qint8)
    plain = torch.zeros(10, dtype=torch.float32)
    # The tied duplicates come first: counting must go on past them to the tensors after.
    state = {"a": a, "a_tied": a, "q1": q1, "q1_tied": q1, "b": b, "q2": q2, "plain": plain}
    model = SimpleNamespace(state_dict=lambda: state)
    assert memory.torch_weights_bytes(model) == (16 + 4) + 8 + (32 + 4) + 6 + 40
    # Inside a packed tuple too: a tensor already counted is skipped, the one after it is not.
    packed = SimpleNamespace(state_dict=lambda: {"w": plain, "packed": (plain, torch.zeros(3, dtype=torch.int8))})
    assert memory.torch_weights_bytes(packed) == 40 + 3


def test_weights_bytes_of_an_onnx_variant_are_its_graph_files(monkeypatch, tmp_path):
    import optimize.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "onnx_bytes", lambda path: 4321 if str(path) == str(tmp_path) else -1)
    assert memory.weights_bytes(SimpleNamespace(backend="onnxruntime", onnx_dir=tmp_path)) == 4321
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)  # 6 + 2 fp32
    assert memory.weights_bytes(SimpleNamespace(backend="torch", model=model)) == 32


class Proc:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


@pytest.fixture
def fake_nvml(monkeypatch):
    """NVML and torch.cuda emulated: device 1 of those visible, processes listed per NVML index."""
    import os

    import pynvml
    import torch

    calls = []
    procs = {5: [Proc(1, 999), Proc(os.getpid(), 123 * 2**20)], 1: [Proc(os.getpid(), 7)]}
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    uuids = {"GPU-aaaa": ("handle", 5)}  # what NVML knows each device by

    def by_uuid(name):
        if name not in uuids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        calls.append(f"uuid {name}")
        return uuids[name]

    props = SimpleNamespace(uuid="")  # no UUID from torch: the visible index is used
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", by_uuid)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: procs.get(h[1], []))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    return SimpleNamespace(calls=calls, procs=procs, props=props, uuids=uuids)


def test_nvml_process_memory_maps_the_visible_index_to_nvml(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # torch's device 1 is NVML's device 5
    assert memory.nvml_process_memory() == (123 * 2**20, None)
    assert fake_nvml.calls == ["init", "shutdown"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert memory.nvml_process_memory() == (7, None)  # no remapping: NVML's device 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0000,GPU-aaaa")  # devices named by UUID
    assert memory.nvml_process_memory() == (123 * 2**20, None)


def test_nvml_process_memory_finds_the_device_by_torchs_uuid_first(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the index would say NVML's device 1
    fake_nvml.props.uuid = "aaaa"  # torch's spelling, without NVML's prefix
    assert memory.nvml_process_memory() == (123 * 2**20, None)
    assert fake_nvml.calls == ["init", "uuid GPU-aaaa", "shutdown"]
    fake_nvml.uuids["MIG-bbbb"] = fake_nvml.uuids.pop("GPU-aaaa")  # a MIG instance: NVML's MIG- spelling
    fake_nvml.props.uuid = "bbbb"
    assert memory.nvml_process_memory() == (123 * 2**20, None)
    assert fake_nvml.calls[-2:] == ["uuid MIG-bbbb", "shutdown"]


def test_nvml_process_memory_says_why_when_the_process_is_not_listed_or_hidden(fake_nvml, monkeypatch):
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    fake_nvml.procs[5] = [Proc(1, 999), Proc(2, 999)]
    assert memory.nvml_process_memory() == (None, f"NVML lists 2 process(es) on the device, none with this process's "
                                                  f"PID {os.getpid()} (a container's PIDs are not the host's)")
    fake_nvml.procs[5] = [Proc(os.getpid(), None)]  # containers often hide the figure
    assert memory.nvml_process_memory() == (None, "NVML lists this process without its memory (not permitted here)")
    assert fake_nvml.calls[-1] == "shutdown"


def test_nvml_process_memory_without_nvidia_ml_py_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert memory.nvml_process_memory() == (None, "nvidia-ml-py is not installed")


def test_cuda_memory_reads_the_allocator_peaks(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 2000)
    monkeypatch.setattr(memory, "nvml_process_memory", lambda: (3000, None))
    memory.reset_cuda_peaks()
    assert calls == ["sync", "reset"]
    assert memory.cuda_memory() == ({"cuda_max_allocated_bytes": 1000, "cuda_max_reserved_bytes": 2000,
                                     "nvml_process_bytes": 3000}, None)
    assert calls == ["sync", "reset", "sync"]
