"""ONNX export of a causal LM with past key/values, and loading it in ONNX Runtime.

The export goes through optimum's ``main_export`` with the ``text-generation-with-past``
task: one ``model.onnx`` whose inputs are ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{layer}.{key,value}`` (B, kv_heads, past, head_dim),
and whose outputs are ``logits`` and the ``present.*`` cache. The same graph serves the
prefill (past of length 0) and every decode step, so ``ORTModelForCausalLM.generate``
decodes with a KV cache.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

DTYPES = ("float32", "float16")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
ONNX_FILE = "model.onnx"  # the name main_export writes and ORTModelForCausalLM looks for
TASK = "text-generation-with-past"
MIN_OPSET = 14  # optimum refuses to export decoder LMs below this
PAST_PREFIX = "past_key_values."
INSTALL_HINT = "pip install 'infermatrix[cpu]' or 'infermatrix[gpu]'"


def require_onnxruntime():
    """The ``onnxruntime`` module, or ``NotApplicable`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise NotApplicable(f"ONNX Runtime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def execution_provider(device: str) -> str:
    """The ORT execution provider for ``device``; ``NotApplicable`` when it is missing."""
    ort = require_onnxruntime()
    if device != "cuda":
        return "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise NotApplicable("ONNX Runtime has no CUDAExecutionProvider here: pip install 'infermatrix[gpu]' "
                            "(onnxruntime-gpu) in place of onnxruntime")
    return "CUDAExecutionProvider"


def onnx_files(onnx_dir: Path) -> list[Path]:
    """The model file and its external-data files (written beside it for graphs over 2 GB)."""
    return sorted(f for f in Path(onnx_dir).iterdir()
                  if f.is_file() and (f.suffix == ".onnx" or f.name.endswith((".onnx_data", ".onnx.data"))))


def onnx_bytes(onnx_dir: Path) -> int:
    return sum(f.stat().st_size for f in onnx_files(onnx_dir))


def graph_io(onnx_path: Path) -> tuple[list[str], list[str]]:
    """Names of the graph's inputs and outputs (reads the graph only, not the weights)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def require_exportable(model_dir: Path) -> str:
    """The model type, or ``NotApplicable`` when optimum has no ONNX config for it with past key/values."""
    import json

    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs with TasksManager
    from optimum.exporters.tasks import TasksManager

    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", "?")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                library_name="transformers")
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise NotApplicable(f"optimum-onnx {_version('optimum-onnx')} has no ONNX export with past key/values "
                            f"({TASK}) for model type {model_type!r}")
    return model_type


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


# ONNX Runtime's input type strings and their element bytes.
_ORT_ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(double)": 8,
                      "tensor(int8)": 1, "tensor(uint8)": 1}


def _past_keys(onnx_dir: Path, session=None) -> tuple[tuple[tuple[int, ...], int], ...]:
    """(dims, element bytes) of each ``past_key_values.{i}.key`` input of the graph (symbolic dims as 0).

    With the loaded ``session`` (an ``onnxruntime.InferenceSession``) they are read off its inputs:
    parsing the file instead holds the whole graph, weights included when they are embedded, in
    memory for a moment, which a measured process must not do.
    """
    if session is not None:
        keys = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX) and i.name.endswith(".key")]
        if not keys:
            raise NotApplicable(f"the ONNX graph in {onnx_dir} has no {PAST_PREFIX}*.key inputs")
        unknown = sorted({k.type for k in keys} - set(_ORT_ELEMENT_BYTES))
        if unknown:
            raise NotApplicable(f"the ONNX graph in {onnx_dir} has past keys of type {', '.join(unknown)}")
        return tuple((tuple(d if isinstance(d, int) else 0 for d in k.shape), _ORT_ELEMENT_BYTES[k.type])
                     for k in keys)
    path = Path(onnx_dir) / ONNX_FILE
    return _read_past_keys(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_past_keys(path: Path, _mtime_ns: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Parsed once per process and version of the file: a large graph takes a second to parse."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    keys = [i for i in graph.input if i.name.startswith(PAST_PREFIX) and i.name.endswith(".key")]
    if not keys:
        raise NotApplicable(f"the ONNX graph in {path.parent} has no {PAST_PREFIX}*.key inputs")
    return tuple((tuple(d.dim_value for d in k.type.tensor_type.shape.dim),
                  tensor_dtype_to_np_dtype(k.type.tensor_type.elem_type).itemsize) for k in keys)


def onnx_kv_geometry(onnx_dir: Path, session=None):
    """The KV-cache shape from the graph's ``past_key_values.{i}.key`` inputs (B, kv_heads, past, head_dim).

    ``session``: the loaded graph's ONNX Runtime session, read instead of the file (see ``_past_keys``).
    """
    from optimize.introspect import KVGeometry

    keys = _past_keys(onnx_dir, session)
    dims = keys[0][0]
    return KVGeometry(len(keys), dims[1], dims[3], "onnx graph")


def onnx_kv_element_bytes(onnx_dir: Path, session=None) -> int:
    """Bytes per element of the graph's KV cache, from its past-key inputs' type (2 for an fp16 export)."""
    return _past_keys(onnx_dir, session)[0][1]


EMBEDDING_BYTES, EMBEDDING_ERROR = "embedding_table_bytes", "embedding_table_error"  # manifest keys


def embedding_table_bytes(onnx_dir: Path) -> int:
    """Bytes of the initializer the graph's ``Gather`` on ``input_ids`` reads (the input embedding table).

    Parses the graph: done once when the artifact is built (the manifest keeps the figure), since a
    graph with embedded weights is held whole in memory while parsed.

    Raises:
        LookupError: no ``Gather`` on ``input_ids`` reads an initializer (directly or through
            ``DequantizeLinear``), so the table's size is unknown.

    """
    import onnx

    path = Path(onnx_dir) / ONNX_FILE
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {init.name: init for init in graph.initializer}
    # A static-int8 graph dequantizes the table first: follow DequantizeLinear back to its initializer.
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        table = dequantized.get(node.input[0], node.input[0]) if node.op_type == "Gather" else None
        if table is not None and node.input[1] == "input_ids" and table in inits:
            init = inits[table]
            return math.prod(init.dims) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    raise LookupError(f"no embedding table found in {path}: no Gather on input_ids reads an initializer "
                      "(directly or through DequantizeLinear)")


def embedding_facts(onnx_dir: Path) -> dict:
    """The manifest entries for an ONNX artifact's input embedding table: its bytes, or why they are unknown."""
    try:
        return {EMBEDDING_BYTES: embedding_table_bytes(onnx_dir)}
    except LookupError as exc:
        return {EMBEDDING_BYTES: None, EMBEDDING_ERROR: str(exc)}


def _opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@register
@dataclass(frozen=True)
class OnnxExport(Step):
    """Export to ONNX (with past key/values) and run the variant in ONNX Runtime."""

    technique = "onnx-export"
    stage = "export"
    backend = "any"
    summary = "ONNX export with KV cache (optimum), run in ONNX Runtime"
    dtype: str = "float32"
    optimization_level: str = "all"  # ORT GraphOptimizationLevel applied when the session is created
    opset: int = 0  # 0: the exporter's default for the architecture

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError(f"onnx-export.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise RecipeError(f"onnx-export.optimization_level must be one of {OPTIMIZATION_LEVELS}, "
                              f"got {self.optimization_level!r}")
        if self.opset != 0 and self.opset < MIN_OPSET:
            raise RecipeError(f"onnx-export.opset must be 0 (exporter default) or >= {MIN_OPSET}, got {self.opset}")

    def matmul_dtype(self, before: str, device: str) -> str:
        return self.dtype  # the graph's weights and activations

    def is_lossless(self) -> bool:
        return self.dtype == "float32"

    def apply(self, state) -> dict:
        if self.dtype == "float16" and state.device != "cuda":
            raise NotApplicable("fp16 ONNX export needs CUDA: the exporter traces the model in fp16 on the GPU, "
                                "and ORT's CPU provider has no fast fp16 kernels")
        execution_provider(state.device)  # fail before exporting a graph this machine cannot run
        model_type = require_exportable(state.source_dir)
        import onnx
        from optimum.exporters.onnx import main_export

        if self.opset > onnx.defs.onnx_opset_version():
            raise RecipeError(f"onnx-export.opset {self.opset} is newer than this onnx package supports "
                              f"({onnx.defs.onnx_opset_version()})")
        out = Path(state.work_dir)
        t0 = time.perf_counter()
        main_export(
            str(state.source_dir), output=str(out), task=TASK, opset=self.opset or None,
            # fp32 traces on the CPU (same graph, no GPU memory); fp16 needs the GPU.
            device="cuda" if self.dtype == "float16" else "cpu", dtype="fp16" if self.dtype == "float16" else "fp32",
            # optimum's check runs random inputs at a loose tolerance and doubles peak memory; the
            # bench's drift metrics compare the variant with the reference on real text instead.
            do_validation=False, trust_remote_code=state.trust_remote_code, library_name="transformers",
        )
        export_s = time.perf_counter() - t0
        shutil.rmtree(out / "weights", ignore_errors=True)  # the store's copy of the weights-stage model
        state.backend, state.onnx_dir = "onnxruntime", out
        inputs, outputs = graph_io(out / ONNX_FILE)
        return {
            "exporter": "optimum.exporters.onnx.main_export",
            "task": TASK,
            "model_type": model_type,
            "dtype": self.dtype,
            "opset": _opset(out / ONNX_FILE),
            "inputs": [n for n in inputs if not n.startswith(PAST_PREFIX)],
            "past_key_value_inputs": sum(n.startswith(PAST_PREFIX) for n in inputs),
            "outputs": [n for n in outputs if not n.startswith("present.")],
            "onnx_bytes": onnx_bytes(out),
            "export_s": round(export_s, 3),
        }


def session_options(step: OnnxExport, threads: int | None = None):
    """ORT session options carrying ``step``'s graph optimisation level and ``threads`` intra-op threads.

    ``threads`` None keeps ONNX Runtime's default (one per physical core).
    """
    ort = require_onnxruntime()
    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[step.optimization_level]
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
    return options


def load_ort_model(path: Path, device: str, step: OnnxExport):
    """An ``ORTModelForCausalLM`` over the artifact at ``path``, decoding with its KV cache.

    Raises:
        NotApplicable: ONNX Runtime (or its CUDA provider, on ``cuda``) is missing, or the
            session did not get the provider asked for (no silent fallback to the CPU).

    """
    provider = execution_provider(device)
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    # As many threads as torch has (--threads, OMP_NUM_THREADS or the cores): the variants of one
    # run compare on the same threads, whichever runtime they use.
    options = session_options(step, torch.get_num_threads() if device == "cpu" else None)
    model = ORTModelForCausalLM.from_pretrained(str(path), file_name=ONNX_FILE, provider=provider,
                                                session_options=options, use_cache=True)
    if model.providers[0] != provider:
        raise NotApplicable(f"ONNX Runtime could not start {provider} (the session got {model.providers}); "
                            "check the CUDA and cuDNN libraries onnxruntime-gpu needs")
    return model


def intra_op_threads(model) -> int | None:
    """The intra-op thread count the model's session was given; None where ONNX Runtime chose it."""
    session = getattr(model, "session", None)
    return (session.get_session_options().intra_op_num_threads or None) if session is not None else None


def ort_label(model) -> str:
    """A one-line note for reports: ONNX Runtime's version and the provider actually running."""
    ort = require_onnxruntime()
    label = f"ONNX Runtime {ort.__version__}, {model.providers[0]}"
    threads = intra_op_threads(model)
    label += f", {threads} intra-op thread{'s' * (threads != 1)}" if threads else ""
    # optimum binds inputs and outputs on the CUDA provider: no host round trip per token
    return label + (", I/O binding (inputs and outputs stay on the device)" if model.use_io_binding else "")
