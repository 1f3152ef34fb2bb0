"""ONNX export (with KV cache) and ONNX Runtime int8 quantization on the tiny Llama."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed (pip install 'infermatrix[cpu]')")

from optimize.errors import NotApplicable, RecipeError  # noqa: E402
from optimize.export.onnx import (  # noqa: E402
    ONNX_FILE,
    OnnxExport,
    graph_io,
    onnx_bytes,
    onnx_kv_element_bytes,
    onnx_kv_geometry,
)
from optimize.introspect import KVGeometry  # noqa: E402
from optimize.quantize.ort import OrtInt8Dynamic, OrtInt8Static  # noqa: E402
from optimize.recipe import Recipe  # noqa: E402
from optimize.state import VariantState  # noqa: E402
from optimize.store import VariantStore, load_variant  # noqa: E402

NEW_TOKENS = 8
FP32 = Recipe(name="onnx-fp32", steps=(OnnxExport(),))
INT8 = {
    "dynamic": Recipe(name="onnx-int8-dynamic", steps=(OnnxExport(), OrtInt8Dynamic())),
    "static": Recipe(name="onnx-int8-static", steps=(OnnxExport(), OrtInt8Static())),
}


@pytest.fixture(scope="module")
def variant(tiny_ref, cache_dir):
    """Load (building once) a recipe's variant on the CPU from the session's store."""
    loaded = {}

    def get(recipe: Recipe):
        if recipe.name not in loaded:
            loaded[recipe.name] = load_variant(tiny_ref, recipe, "cpu", VariantStore(cache_dir))
        return loaded[recipe.name]

    return get


def _graph(artifact_path: Path):
    import onnx

    return onnx.load(str(artifact_path / ONNX_FILE))


def test_export_graph_takes_and_returns_past_key_values(variant):
    state, artifact = variant(FP32)
    inputs, outputs = graph_io(artifact.path / ONNX_FILE)
    past = [f"past_key_values.{layer}.{kv}" for layer in range(2) for kv in ("key", "value")]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
    assert outputs == ["logits", *(p.replace("past_key_values", "present") for p in past)]
    assert state.backend == "onnxruntime" and state.onnx_dir == artifact.path
    assert not (artifact.path / "weights").exists()
    assert artifact.manifest["reports"][0]["past_key_value_inputs"] == 4
    # 2 layers, 2 KV heads (GQA 4/2), head dim 128 / 4, fp32
    assert onnx_kv_geometry(artifact.path) == KVGeometry(2, 2, 32, "onnx graph")
    assert onnx_kv_element_bytes(artifact.path) == 4


def test_a_cell_reads_the_kv_cache_off_the_loaded_session_never_parsing_the_graph(variant, monkeypatch):
    """Parsing model.onnx holds the graph, embedded weights included, in memory: seen as an onnx-fp32 serving
    peak of 2005 MiB on a 134M model that an independent ORT process serves in 1141 MiB."""
    import optimize.export.onnx as export
    from bench.metrics.roofline_cell import kv_element_bytes, kv_geometry

    state, artifact = variant(FP32)
    from_file = (onnx_kv_geometry(artifact.path), onnx_kv_element_bytes(artifact.path))

    def no_parse(*args, **kwargs):
        raise AssertionError("the graph file was parsed inside the measured window")

    monkeypatch.setattr(export, "_read_past_keys", no_parse)
    monkeypatch.setattr("onnx.load", no_parse)
    assert (kv_geometry(state), kv_element_bytes(state)) == (from_file[0], from_file[1]) == \
        (KVGeometry(2, 2, 32, "onnx graph"), 4)


def test_nothing_parses_the_graph_after_the_load_of_an_onnx_cell(tiny_ref, cache_dir, monkeypatch):
    """An ONNX cell, run as a cell runs (bench.cell.measure) with its roofline, with onnx.load trapped from the
    end of the load on: the KV cache's shape comes off the session and the embedding table's size from the
    manifest (parsing holds the graph, weights and all, in memory: inside the serving window it counted)."""
    import onnx
    from transformers import AutoModelForCausalLM

    import bench.metrics.memory_cell as memory_cell
    import optimize.export.onnx as export

    parsed, window = [], {"open": False}
    real_load, real_close = onnx.load, memory_cell.close_load_window

    def load(*args, **kwargs):
        if window["open"]:
            parsed.append(args[0] if args else kwargs)
        return real_load(*args, **kwargs)

    def close(device):
        out = real_close(device)
        window["open"] = True
        return out

    export._read_past_keys.cache_clear()  # a parse cached by an earlier test would hide one in the window
    monkeypatch.setattr(onnx, "load", load)
    monkeypatch.setattr(memory_cell, "close_load_window", close)
    ceilings = {"device": "cpu", "memory": {"bandwidth_gbps": 30.0}, "matmul": {"float32": {"tflops": 0.2}}}
    record = _onnx_cell(cache_dir, ceilings=ceilings)
    assert record["status"] == "ok", record["error"]
    assert window == {"open": True} and parsed == []
    assert record["metrics"]["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # K and V x layers x heads x dim x 4
    assert type(record["metrics"]["kv_cache_bytes_per_token"]) is int  # as a torch cell's (results.csv read 6144.0)
    table = AutoModelForCausalLM.from_pretrained(tiny_ref.path).get_input_embeddings().weight
    assert record["metrics"]["embedding_bytes_not_read"] == table.numel() * 4  # untied, fp32
    assert "roofline_error" not in record["method"]


def test_an_artifact_built_before_the_manifest_kept_the_table_size_is_parsed(tiny_ref, cache_dir):
    from types import SimpleNamespace

    from bench.metrics.memory import untied_embedding_bytes
    from optimize.export.onnx import EMBEDDING_BYTES, EMBEDDING_ERROR, embedding_table_bytes

    artifact = VariantStore(cache_dir).get_or_build(tiny_ref, Recipe(name="onnx-fp32", steps=(OnnxExport(),)), "cpu")
    assert artifact.manifest[EMBEDDING_BYTES] == embedding_table_bytes(artifact.path) > 0
    state = SimpleNamespace(backend="onnxruntime", onnx_dir=artifact.path,
                            model=SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=False)))
    old = {k: v for k, v in artifact.manifest.items() if k != EMBEDDING_BYTES}
    assert untied_embedding_bytes(state, old) == untied_embedding_bytes(state) == artifact.manifest[EMBEDDING_BYTES]
    with pytest.raises(LookupError, match="^no table$"):  # a graph where none was found at build time
        untied_embedding_bytes(state, {EMBEDDING_BYTES: None, EMBEDDING_ERROR: "no table"})


def _onnx_cell(cache_dir, threads: int = 0, ceilings: dict | None = None) -> dict:
    """The record of a one-repetition onnx-fp32 cell of the tiny model, measured in this process as a cell is."""
    import dataclasses

    import bench.cell as cell_module
    from bench.cells import Cell, MeasureConfig
    from bench.scenarios.generate import GenerateScenario
    from optimize.registry import builtin_variant

    measure = dataclasses.replace(MeasureConfig(), roofline=ceilings is not None, threads=threads)
    measure = dataclasses.replace(measure, repeat=dataclasses.replace(measure.repeat, warmup=0, min_reps=1,
                                                                      max_reps=1, budget_s=0.0))
    cell = Cell(model="synthetic:llama-tiny", recipe=builtin_variant("onnx-fp32"), device="cpu",
                scenario=GenerateScenario(batch_size=1, prompt_tokens=8, new_tokens=2), measure=measure,
                cache_dir=str(cache_dir), ceilings=ceilings)
    return cell_module.measure(cell.to_dict())


def test_an_onnx_cell_runs_on_the_threads_asked_for_and_records_them(cache_dir):
    """--threads must bind ONNX Runtime too: left alone it takes one thread per core, so with --threads 1
    an ONNX variant would race a one-thread torch variant on all the cores."""
    import torch

    before = torch.get_num_threads()
    try:
        record = _onnx_cell(cache_dir, threads=1)
    finally:
        torch.set_num_threads(before)
    assert record["status"] == "ok", record["error"]
    assert (record["method"]["torch_threads"], record["method"]["ort_intra_op_threads"]) == (1, 1)
    assert any(label.endswith("CPUExecutionProvider, 1 intra-op thread") for label in record["labels"])


def test_session_inputs_give_the_element_bytes_of_each_past_key_type(tmp_path):
    import os

    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    for elem_type, size in ((TensorProto.FLOAT16, 2), (TensorProto.FLOAT, 4), (TensorProto.DOUBLE, 8)):
        past = [helper.make_tensor_value_info(f"past_key_values.{i}.key", elem_type, ["batch", 3, "past", 8])
                for i in range(2)]
        outs = [helper.make_tensor_value_info(f"present.{i}.key", elem_type, ["batch", 3, "past", 8])
                for i in range(2)]
        nodes = [helper.make_node("Identity", [f"past_key_values.{i}.key"], [f"present.{i}.key"]) for i in range(2)]
        model = helper.make_model(helper.make_graph(nodes, "g", past, outs),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(tmp_path / ONNX_FILE))
        session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
        assert onnx_kv_element_bytes(tmp_path, session) == size == onnx_kv_element_bytes(tmp_path)
        assert onnx_kv_geometry(tmp_path, session) == KVGeometry(2, 3, 8, "onnx graph") == onnx_kv_geometry(tmp_path)
        stamp = (tmp_path / ONNX_FILE).stat().st_mtime_ns
        os.utime(tmp_path / ONNX_FILE, ns=(stamp + 10**9, stamp + 10**9))  # the file cache sees each rewrite


def test_kv_element_bytes_follow_the_graphs_past_key_type_and_its_rewrites(tmp_path):
    """An fp16 export's cache is 2 bytes an element; the graph is read again once the file changes."""
    import os

    import onnx
    from onnx import TensorProto, helper

    def save(elem_type, kv_heads):
        past = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", elem_type, ["batch", kv_heads, "past", 16])
                for i in range(3) for kv in ("key", "value")]
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
        out = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "seq"])
        graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g", [ids, *past], [out])
        onnx.save(helper.make_model(graph), str(tmp_path / ONNX_FILE))

    save(TensorProto.FLOAT16, 4)
    assert onnx_kv_element_bytes(tmp_path) == 2
    assert onnx_kv_geometry(tmp_path) == KVGeometry(3, 4, 16, "onnx graph")
    stamp = (tmp_path / ONNX_FILE).stat().st_mtime_ns
    save(TensorProto.FLOAT, 2)
    os.utime(tmp_path / ONNX_FILE, ns=(stamp + 10**9, stamp + 10**9))  # a rewrite within the clock's tick
    assert onnx_kv_element_bytes(tmp_path) == 4
    assert onnx_kv_geometry(tmp_path) == KVGeometry(3, 2, 16, "onnx graph")


def test_onnx_fp32_greedy_tokens_equal_torch_reference(variant, tiny_prompts):
    import torch

    from bench.scenarios.generate import greedy_generate

    reference, _ = variant(Recipe(name="fp32"))
    onnx_state, _ = variant(FP32)
    assert torch.equal(greedy_generate(onnx_state, tiny_prompts, NEW_TOKENS),
                       greedy_generate(reference, tiny_prompts, NEW_TOKENS))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_graph_holds_int8_weights_and_is_smaller(variant, kind):
    import onnx

    _, fp32 = variant(FP32)
    _, artifact = variant(INT8[kind])
    graph = _graph(artifact.path).graph
    ops = {n.op_type for n in graph.node}
    expected_ops = {"DynamicQuantizeLinear", "MatMulInteger"} if kind == "dynamic" else {"QuantizeLinear",
                                                                                         "DequantizeLinear"}
    assert expected_ops <= ops
    weights = {i.name: i.data_type for i in graph.initializer if len(i.dims) == 2}
    # 7 linears x 2 layers and the LM head in int8; the embedding table in uint8 (ORT quantizes
    # Gather data with the activation type).
    assert sum(t == onnx.TensorProto.INT8 for t in weights.values()) == 15
    assert weights["model.embed_tokens.weight_quantized"] == onnx.TensorProto.UINT8
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 for i in graph.initializer)
    assert onnx_bytes(artifact.path) < onnx_bytes(fp32.path) / 3
    report = artifact.manifest["reports"][1]
    assert report["quantized_weights"] == 16 and report["bytes_after"] < report["bytes_before"]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_variant_generates_what_the_graph_computes(variant, tiny_prompts, kind):
    import torch

    from bench.scenarios.generate import greedy_generate

    state, artifact = variant(INT8[kind])
    out = greedy_generate(state, tiny_prompts, NEW_TOKENS)
    assert out.shape == (2, tiny_prompts.shape[1] + NEW_TOKENS)
    assert (out[:, : tiny_prompts.shape[1]] == tiny_prompts).all()
    # A second implementation: the same graph run by onnxruntime directly, the whole sequence each
    # step with an empty cache, greedy by argmax. The harness's cached generation must match it.
    assert torch.equal(out, _greedy_without_cache(artifact.path / ONNX_FILE, tiny_prompts, NEW_TOKENS))


def _greedy_without_cache(path, prompts, new_tokens):
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = prompts.numpy().astype(np.int64)  # (B, T)
    for _ in range(new_tokens):
        batch, length = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((batch, 2, 0, 32), dtype=np.float32)  # (B, kv_heads, past, head_dim)
        logits = session.run(["logits"], feed)[0]  # (B, T, V)
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return torch.from_numpy(ids)


def test_static_calibration_feeds_eval_text_windows(variant, tiny_ref):
    import torch

    from optimize.models import eval_token_ids

    _, artifact = variant(FP32)
    state = VariantState(ref=tiny_ref, device="cpu", source_dir=artifact.path, backend="onnxruntime",
                         onnx_dir=artifact.path)
    reader = OrtInt8Static(calibration_samples=4, calibration_tokens=32).reader(state)
    ids = eval_token_ids(tiny_ref, 8192)
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 4
    last = len(ids) - 32
    assert reader.starts[0] == 0 and reader.starts[-1] == last  # spread over the whole text
    for k, start in enumerate(reader.starts):  # evenly: within a token of k/3 of the way
        assert abs(start - k * last / 3) < 1
    for start, feed in zip(reader.starts, feeds, strict=True):
        assert torch.equal(torch.from_numpy(feed["input_ids"][0]), ids[start : start + 32])
        assert feed["attention_mask"].shape == (1, 32) and feed["attention_mask"].all()
        assert feed["position_ids"].tolist() == [list(range(32))]
        assert feed["past_key_values.0.key"].shape == (1, 2, 0, 32)  # (B, kv_heads, past, head_dim)
    reader.rewind()
    assert reader.get_next()["input_ids"].tolist() == feeds[0]["input_ids"].tolist()


def test_static_report_counts_calibration_tokens(variant):
    _, artifact = variant(INT8["static"])
    report = artifact.manifest["reports"][1]
    assert report["calibration_tokens"] == 16 * 128 and report["format"] == "QDQ"
    assert any("evaluation text" in label for label in artifact.manifest["labels"])


def test_fp16_export_on_cpu_is_not_applicable(tiny_ref, tmp_path):
    store = VariantStore(tmp_path)
    with pytest.raises(NotApplicable, match="fp16 ONNX export needs CUDA"):
        store.get_or_build(tiny_ref, Recipe(name="onnx-fp16", steps=(OnnxExport(dtype="float16"),)), "cpu")
    assert not any(store.root.iterdir())  # no half-built artifact left behind


def test_second_get_or_build_reuses_artifact(tiny_ref, tmp_path):
    store = VariantStore(tmp_path)
    first = store.get_or_build(tiny_ref, FP32, "cpu")
    second = store.get_or_build(tiny_ref, FP32, "cpu")
    assert not first.reused and second.reused
    assert second.path == first.path and second.manifest == first.manifest


@pytest.mark.parametrize("step", [
    OnnxExport(dtype="bfloat16"),
    OnnxExport(optimization_level="max"),
    OnnxExport(opset=11),
    OrtInt8Dynamic(weight_type="int4"),
    OrtInt8Static(method="mse"),
    OrtInt8Static(calibration_samples=0),
], ids=repr)
def test_bad_config_raises_recipe_error(step):
    with pytest.raises(RecipeError, match=step.technique):
        step.validate()


@pytest.mark.parametrize("level, ort_level", [("disable", "ORT_DISABLE_ALL"), ("basic", "ORT_ENABLE_BASIC"),
                                               ("extended", "ORT_ENABLE_EXTENDED"), ("all", "ORT_ENABLE_ALL")])
def test_session_options_carry_the_export_optimization_level(level, ort_level):
    import onnxruntime

    from optimize.export.onnx import session_options

    options = session_options(OnnxExport(optimization_level=level))
    assert options.graph_optimization_level == getattr(onnxruntime.GraphOptimizationLevel, ort_level)


def test_cuda_device_without_cuda_provider_is_not_applicable():
    import onnxruntime

    from optimize.export.onnx import execution_provider

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA provider exists")
    with pytest.raises(NotApplicable, match="infermatrix\\[gpu\\]"):
        execution_provider("cuda")


def test_the_label_names_the_provider_and_whether_inputs_and_outputs_stay_on_the_device(tiny_ref, cache_dir):
    from types import SimpleNamespace

    import onnxruntime
    import torch

    from optimize.export.onnx import intra_op_threads, ort_label

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what --threads 1 does in a cell, before the load
    try:
        state, _ = load_variant(tiny_ref, Recipe(name="onnx-fp32", steps=(OnnxExport(),)), "cpu",
                                VariantStore(cache_dir))
    finally:
        torch.set_num_threads(before)
    assert intra_op_threads(state.model) == 1  # ONNX Runtime runs on torch's threads, not one per core
    assert ort_label(state.model) == f"ONNX Runtime {onnxruntime.__version__}, CPUExecutionProvider, 1 intra-op thread"
    cuda = SimpleNamespace(providers=["CUDAExecutionProvider", "CPUExecutionProvider"], use_io_binding=True)
    assert ort_label(cuda) == (f"ONNX Runtime {onnxruntime.__version__}, CUDAExecutionProvider, "
                               "I/O binding (inputs and outputs stay on the device)")


def test_importing_modules_loads_no_heavy_library():
    code = ("import sys, optimize.export.onnx, optimize.quantize.ort; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'optimum', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _require_cuda_provider():
    import onnxruntime
    import torch

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu's CUDAExecutionProvider")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_export_generates_on_cuda_provider(tiny_ref, cache_dir, tiny_prompts, dtype):
    _require_cuda_provider()
    from bench.scenarios.generate import greedy_generate

    recipe = Recipe(name=f"onnx-{dtype}", steps=(OnnxExport(dtype=dtype),))
    state, _ = load_variant(tiny_ref, recipe, "cuda", VariantStore(cache_dir))
    assert state.model.providers[0] == "CUDAExecutionProvider"
    assert state.model.use_io_binding  # no host round trip per token
    assert onnx_kv_element_bytes(state.onnx_dir) == (2 if dtype == "float16" else 4)
    assert onnx_kv_element_bytes(state.onnx_dir, state.model.session) == (2 if dtype == "float16" else 4)
    assert greedy_generate(state, tiny_prompts, NEW_TOKENS).shape == (2, tiny_prompts.shape[1] + NEW_TOKENS)
