"""ONNX Runtime int8 quantization of an exported decoder graph, in place.

Both steps quantize the same weights: every ``MatMul`` whose second input is a weight
initializer (q/k/v/o, gate/up/down, LM head) and the token-embedding ``Gather``, whose
table ORT stores in uint8 (it quantizes ``Gather`` data with the activation type). The
attention matmuls (activation x activation) and the KV cache stay in float, so the
quantized graph keeps the export's inputs and outputs and ``ORTModelForCausalLM`` loads it
like the float one.

- ``ort-int8-dynamic``: ``quantize_dynamic``; weights int8, activations quantized per call
  (``DynamicQuantizeLinear`` + ``MatMulInteger``).
- ``ort-int8-static``: ``quantize_static`` in QDQ format; activation ranges calibrated on
  windows of the evaluation text (prefill with an empty cache). MatMul outputs are left in
  float: quantizing them would put the logits and the K/V on a uint8 grid.

``quant_pre_process`` (symbolic shape inference and an ORT pre-optimisation) is not run:
weight MatMuls need no inferred shapes, the quantized graphs gave the same logits on the tiny
Llama, and it costs a full extra copy of the model for large ones.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from optimize.errors import NotApplicable, RecipeError
from optimize.export.onnx import ONNX_FILE, PAST_PREFIX, onnx_bytes, onnx_files, require_onnxruntime
from optimize.recipe import Step
from optimize.registry import register

WEIGHT_TYPES = ("qint8", "quint8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("MatMul", "Gather")
QUANT_NODE_TYPES = ("DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear",
                    "QLinearMatMul", "MatMulIntegerToFloat")
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, less headroom for the graph itself


def weight_nodes(model, op_types=QUANTIZED_OPS) -> list[str]:
    """Names of ``op_types`` nodes that read a weight initializer (not activation x activation)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(x in inits for x in n.input)]


def quant_summary(onnx_path: Path) -> dict:
    """Quantization node counts and the number of int8/uint8 weight tensors in a graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    int_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    nodes = Counter(n.op_type for n in model.graph.node if n.op_type in QUANT_NODE_TYPES)
    weights = sum(1 for i in model.graph.initializer if i.data_type in int_types and len(i.dims) >= 2)
    return {"quant_nodes": dict(sorted(nodes.items())), "quantized_weights": weights}


def _float_graph(onnx_path: Path):
    """The graph (without its weights); ``NotApplicable`` for fp16 exports."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        raise NotApplicable("ORT int8 quantization starts from an fp32 graph; this export is fp16 "
                            "(use onnx-export with dtype = 'float32')")
    return model


class _DropPreprocessAdvice(logging.Filter):
    """ORT logs 'consider pre-processing' on every call; the module docstring says why we don't."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _replacing_graph(onnx_dir: Path):
    """Yield a path to write the new graph to; it then replaces ``onnx_dir``'s graph files.

    The new graph is written to a sub-directory first, so a failed quantization leaves the
    float graph untouched, and removed after, so ORT never finds two ``.onnx`` files.
    """
    tmp = Path(onnx_dir) / ".quantizing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log_filter = _DropPreprocessAdvice()
    logging.getLogger().addFilter(log_filter)
    try:
        yield tmp / ONNX_FILE
        for f in onnx_files(onnx_dir):
            f.unlink()
        for f in tmp.iterdir():
            f.rename(Path(onnx_dir) / f.name)
    finally:
        logging.getLogger().removeFilter(log_filter)
        shutil.rmtree(tmp, ignore_errors=True)


@register
@dataclass(frozen=True)
class OrtInt8Dynamic(Step):
    """int8 weights, activations quantized per call (ORT ``quantize_dynamic``)."""

    technique = "ort-int8-dynamic"
    stage = "graph"
    backend = "onnxruntime"
    summary = "ONNX Runtime dynamic int8 (MatMulInteger), weights and embedding int8"
    per_channel: bool = False  # one scale per output column of each weight, else per tensor
    weight_type: str = "qint8"

    def matmul_dtype(self, before: str, device: str) -> str:
        return "int8"  # MatMulInteger: uint8 activations x int8 weights

    def validate(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise RecipeError(f"ort-int8-dynamic.weight_type must be one of {WEIGHT_TYPES}, got {self.weight_type!r}")

    def apply(self, state) -> dict:
        require_onnxruntime()
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = Path(state.onnx_dir) / ONNX_FILE
        nodes = weight_nodes(_float_graph(src))
        before = onnx_bytes(state.onnx_dir)
        t0 = time.perf_counter()
        with _replacing_graph(state.onnx_dir) as dst:
            quantize_dynamic(src, dst, op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes,
                             per_channel=self.per_channel,
                             weight_type=QuantType.QInt8 if self.weight_type == "qint8" else QuantType.QUInt8,
                             use_external_data_format=before > EXTERNAL_DATA_BYTES)
        state.labels.append(f"ORT dynamic int8: {self.weight_type} weights "
                            f"{'per channel' if self.per_channel else 'per tensor'}, activations quantized per call")
        return {"api": "onnxruntime.quantization.quantize_dynamic", "bytes_before": before,
                "bytes_after": onnx_bytes(state.onnx_dir), "quantize_s": round(time.perf_counter() - t0, 3),
                **quant_summary(src)}


class CalibrationWindows:
    """ORT calibration data reader: evenly spaced windows of real text, one prefill each.

    Every feed is batch 1: ``input_ids`` (1, T) from the token stream, ``attention_mask``
    ones (1, T), ``position_ids`` 0..T-1, and each ``past_key_values.*`` empty (1, kv_heads,
    0, head_dim), the cache's state before a prompt.
    """

    def __init__(self, onnx_path: Path, token_ids, samples: int, tokens: int):
        import onnx

        if len(token_ids) < tokens:
            raise RecipeError(f"ort-int8-static.calibration_tokens {tokens} exceeds the evaluation text's "
                              f"{len(token_ids)} tokens")
        last = len(token_ids) - tokens
        self.starts = [i * last // max(samples - 1, 1) for i in range(samples)]
        self.windows = [token_ids[s : s + tokens].numpy() for s in self.starts]
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        self.inputs = [(i.name, i.type.tensor_type.elem_type, [d.dim_value for d in i.type.tensor_type.shape.dim])
                       for i in graph.input]
        self._next = 0

    def feed(self, window) -> dict:
        import numpy as np
        from onnx.helper import tensor_dtype_to_np_dtype

        ids = window[None, :].astype(np.int64)  # (1, T)
        out = {}
        for name, elem_type, dims in self.inputs:
            if name == "input_ids":
                out[name] = ids
            elif name == "attention_mask":
                out[name] = np.ones_like(ids)
            elif name == "position_ids":
                out[name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
            elif name.startswith(PAST_PREFIX):
                # Symbolic dims are 0 in dim_value: batch -> 1, past length -> 0; heads and head_dim are fixed.
                out[name] = np.zeros([1, *dims[1:]], dtype=tensor_dtype_to_np_dtype(elem_type))
            else:
                raise NotApplicable(f"ort-int8-static: no calibration value for graph input {name!r}")
        return out

    def get_next(self) -> dict | None:
        if self._next >= len(self.windows):
            return None
        self._next += 1
        return self.feed(self.windows[self._next - 1])

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.windows)


def _vocab_size(onnx_dir: Path) -> int:
    import json

    return int(json.loads((Path(onnx_dir) / "config.json").read_text())["vocab_size"])


@register
@dataclass(frozen=True)
class OrtInt8Static(Step):
    """int8 weights and activations in QDQ form, ranges calibrated on the evaluation text."""

    technique = "ort-int8-static"
    stage = "graph"
    backend = "onnxruntime"
    summary = "ONNX Runtime static int8 (QDQ), calibrated on evaluation-text windows"
    calibration_samples: int = 16  # windows, one prefill each
    calibration_tokens: int = 128  # tokens per window
    per_channel: bool = True  # weight scales per output column
    method: str = "minmax"

    def matmul_dtype(self, before: str, device: str) -> str:
        return "int8"  # the CPU provider fuses each DQ -> MatMul -> Q into an int8 kernel

    def validate(self) -> None:
        if self.calibration_samples < 1:
            raise RecipeError(f"ort-int8-static.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.calibration_tokens < 2:
            raise RecipeError(f"ort-int8-static.calibration_tokens must be >= 2, got {self.calibration_tokens}")
        if self.method not in CALIBRATION_METHODS:
            raise RecipeError(f"ort-int8-static.method must be one of {CALIBRATION_METHODS}, got {self.method!r}")

    def reader(self, state) -> CalibrationWindows:
        """The calibration windows for ``state``'s graph, from the model's evaluation tokens."""
        from optimize.models import eval_token_ids

        ids = eval_token_ids(state.ref, _vocab_size(state.onnx_dir), trust_remote_code=state.trust_remote_code)
        return CalibrationWindows(Path(state.onnx_dir) / ONNX_FILE, ids, self.calibration_samples,
                                  self.calibration_tokens)

    def apply(self, state) -> dict:
        require_onnxruntime()
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        src = Path(state.onnx_dir) / ONNX_FILE
        nodes = weight_nodes(_float_graph(src))
        reader = self.reader(state)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.method]
        before = onnx_bytes(state.onnx_dir)
        t0 = time.perf_counter()
        with _replacing_graph(state.onnx_dir) as dst:
            quantize_static(
                src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
                # uint8 activations x int8 weights: the pairing ORT's x86 kernels are built for.
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                # Restricting op types also limits calibration to these nodes' tensors (not the empty cache).
                op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes, calibrate_method=method,
                use_external_data_format=before > EXTERNAL_DATA_BYTES,
                # The embedding Gather keeps its output Q/DQ so ORT gathers int8 rows, not a dequantized table.
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
            )
        tokens = len(reader) * self.calibration_tokens
        state.labels.append(f"ORT static int8 (QDQ, {self.method}), calibrated on {tokens} tokens "
                            "of the evaluation text")
        return {"api": "onnxruntime.quantization.quantize_static", "format": "QDQ", "method": self.method,
                "calibration_tokens": tokens, "calibration_windows": len(reader), "bytes_before": before,
                "bytes_after": onnx_bytes(state.onnx_dir), "quantize_s": round(time.perf_counter() - t0, 3),
                **quant_summary(src)}
