"""Hardware ceilings measured on the machine itself, and how close each cell gets to them.

Decode at small batch is bound by memory bandwidth: every step reads all weights plus the
KV cache of every sequence. Prefill is bound by arithmetic: about 2 FLOPs per parameter
per token in the matrix products, plus attention. Ceilings are measured, not taken from
datasheets: a large tensor copy (bytes read + bytes written) and a large matmul.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.metrics.timing import RepeatConfig, clock_for, repeat, time_call
from optimize.errors import exception_line


@dataclass(frozen=True)
class RooflineConfig:
    copy_bytes_cpu: int = 512 * 2**20  # well past any last-level cache
    copy_bytes_cuda: int = 2 * 2**30
    matmul_n_cpu: int = 2048
    matmul_n_cuda: int = 8192
    reps: int = 7


def _timed(fn, device: str, reps: int) -> list[float]:
    """Seconds per call of ``fn``: one warm-up, then exactly ``reps`` timed calls (the shared timing loop)."""
    # min_reps = max_reps: exactly ``reps`` calls whatever the time budget or the spread.
    cfg = RepeatConfig(warmup=1, min_reps=reps, max_reps=reps)
    clock = clock_for(device)
    return [ms / 1e3 for ms in repeat(lambda: time_call(fn, clock), cfg).samples]


def measure_bandwidth(device: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any]:
    """Copy bandwidth: 2 x bytes (read + write) per copy over the median copy time."""
    import torch

    n_bytes = cfg.copy_bytes_cuda if device == "cuda" else cfg.copy_bytes_cpu
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), device, cfg.reps)
    best, median = min(times), statistics.median(times)
    return {"copy_bytes": n_bytes, "bandwidth_gbps": 2 * n_bytes / median / 1e9,
            "bandwidth_best_gbps": 2 * n_bytes / best / 1e9, "method": "tensor.copy_, (read + write) / median time"}


def _rates(n: int, times: list[float]) -> dict[str, Any]:
    """An n x n x n matmul's rate: 2 n^3 operations (FLOPs, or int8 multiply-adds x 2) over the median time."""
    return {"n": n, "tflops": 2 * n**3 / statistics.median(times) / 1e12, "tflops_best": 2 * n**3 / min(times) / 1e12}


def measure_matmul(device: str, dtype: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any]:
    """Dense matmul rate of torch; ``int8`` is ``torch._int_mm`` (int8 x int8 -> int32).

    The int8 kernel's speed depends on the second operand's layout (cuBLAS's fast int8 path takes
    it column-major; a row-major one went about 5x slower on one GPU): both are timed and the
    faster kept, with ``b_layout`` naming it.
    """
    import torch

    n = cfg.matmul_n_cuda if device == "cuda" else cfg.matmul_n_cpu
    if dtype == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        layouts = {"row-major": b, "column-major": b.t().contiguous().t()}
        rates = {name: _rates(n, _timed(lambda m=m: torch._int_mm(a, m), device, cfg.reps))
                 for name, m in layouts.items()}
        fastest = max(rates, key=lambda name: rates[name]["tflops"])
        return {**rates[fastest], "b_layout": fastest}
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    return _rates(n, _timed(lambda: a @ b, device, cfg.reps))


ORT_MATMUL = {"float32": "MatMul", "int8": "MatMulInteger"}  # ONNX Runtime's CPU kernels measured beside torch's


def measure_ort_matmul(dtype: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any] | None:
    """ONNX Runtime's CPU matmul rate on torch's thread count; None where onnxruntime is not installed.

    ``float32`` is ``MatMul``; ``int8`` is ``MatMulInteger`` (uint8 activations x int8 weights ->
    int32, the pair its quantized graphs run). The second operand is a constant, as a model's
    weights are, so the kernel may pack it once, as it does for a model.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    import numpy as np
    import torch

    n, rng = cfg.matmul_n_cpu, np.random.default_rng(0)
    if dtype == "int8":
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b, a_type, c_type = rng.integers(-128, 128, (n, n), dtype=np.int8), TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b, a_type, c_type = rng.standard_normal((n, n), dtype=np.float32), TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(ORT_MATMUL[dtype], ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("c", c_type, [n, n])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _rates(n, _timed(lambda: session.run(None, {"a": a}), "cpu", cfg.reps))


def matmul_ceiling(device: str, dtype: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any] | None:
    """The fastest measured matmul of ``dtype`` on ``device``: torch's, and on the CPU ONNX Runtime's too.

    torch's CPU matmul is not the machine's best everywhere (its fp32 GEMM reached 185 GFLOP/s on
    a 2-core AMD EPYC where ONNX Runtime's reached 313), and a ceiling below what a variant
    reaches reads as a fraction above 1. None where no back end runs ``dtype`` here.
    """
    figures: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    try:
        figures["torch"] = measure_matmul(device, dtype, cfg)
    except (RuntimeError, NotImplementedError):  # int8 without a kernel on this device
        pass
    if device == "cpu" and dtype in ORT_MATMUL:
        try:
            ort = measure_ort_matmul(dtype, cfg)
        except Exception as exc:  # a second opinion only: its failure must not cost torch's ceiling
            errors["onnxruntime"] = exception_line(exc)
        else:
            if ort is not None:
                figures["onnxruntime"] = ort
    if not figures:
        return None
    backend = max(figures, key=lambda name: figures[name]["tflops"])
    out = {**figures[backend], "backend": backend, "by_backend": {k: v["tflops"] for k, v in figures.items()}}
    return {**out, "errors": errors} if errors else out


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX); without it bf16 matmuls are emulated."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_ceilings(device: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any]:
    """Bandwidth and matmul rates: fp32 and int8 always; bf16 and fp16 on CUDA; bf16 on CPUs with native bf16."""
    import torch

    dtypes = ["float32"]
    if device == "cuda":
        dtypes += ["bfloat16", "float16"]
    elif cpu_has_bf16():
        dtypes.append("bfloat16")
    out: dict[str, Any] = {"device": device, "memory": measure_bandwidth(device, cfg), "matmul": {}}
    for dtype in [*dtypes, "int8"]:
        ceiling = matmul_ceiling(device, dtype, cfg)
        if ceiling is not None:
            out["matmul"][dtype] = ceiling
    out["torch_threads"] = torch.get_num_threads()
    return out


def model_shape(config) -> dict[str, int]:
    """Sizes the FLOP and byte estimates need, from a (possibly pruned) HF config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    h, ffn = config.hidden_size, config.intermediate_size
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * ffn  # q, o, k, v, gate/up/down
    return {"layers": layers, "heads": heads, "head_dim": head_dim,
            "matmul_params": layers * per_layer + h * config.vocab_size}


def prefill_flops(shape: dict[str, int], batch: int, prompt: int) -> float:
    """2 FLOPs per matmul parameter per token, plus causal attention (QK^T and PV: 2 x 2 x P^2/2 per head-dim).

    The LM head counts on every position, as a full forward runs it (cells count their prefill
    with ``optimize.introspect.prefill_flops`` instead, as the variant runs it).
    """
    linear = 2 * shape["matmul_params"] * batch * prompt
    attention = 2 * shape["layers"] * batch * shape["heads"] * shape["head_dim"] * prompt * prompt
    return float(linear + attention)


def cell_roofline(metrics: dict[str, Any], scenario: dict[str, Any], shape: dict[str, int],
                  ceilings: dict[str, Any], compute_dtype: str) -> dict[str, Any]:
    """Achieved prefill FLOP/s and, where the cell decoded, decode bandwidth; their fractions of the ceilings.

    Bytes per decode step = weight bytes + batch x mean context x KV bytes per token, where
    the mean context over the decode is prompt + new_tokens / 2; steps per second =
    decode tokens/s / batch. A prefill-only cell (the prefill sweep) has the prefill figures alone.
    """
    b, p = scenario["batch_size"], scenario["prompt_tokens"]
    # A counted figure ("prefill_flops", for this batch x prompt) wins over the Llama formula.
    total = shape["prefill_flops"] if "prefill_flops" in shape else prefill_flops(shape, b, p)
    flops = total * metrics["prefill_tokens_per_s"] / (b * p)
    out: dict[str, Any] = {"prefill_tflops": flops / 1e12,
                           "roofline_ceilings": {"bandwidth_gbps": ceilings["memory"]["bandwidth_gbps"]}}
    # A float dtype without its own ceiling (bf16 on a CPU without native bf16) is emulated in fp32 arithmetic:
    # fp32's rate bounds it. int8 without one has no bound measured here: no fraction rather than a wrong one.
    ceiling_dtype = compute_dtype if compute_dtype in ceilings["matmul"] else \
        None if compute_dtype == "int8" else "float32"
    if ceiling_dtype is not None:
        ceiling = ceilings["matmul"][ceiling_dtype]
        out["prefill_flops_fraction"] = flops / (ceiling["tflops"] * 1e12)
        out["roofline_ceilings"].update(matmul_tflops=ceiling["tflops"], matmul_dtype=ceiling_dtype,
                                        matmul_backend=ceiling.get("backend", "torch"))
    if "decode_tokens_per_s" not in metrics:
        return out
    if "kv_cache_bytes_per_token" not in metrics:  # a silent 0 would leave the KV cache out of every step
        raise ValueError("cell_roofline needs metrics['kv_cache_bytes_per_token'] (KV cache bytes read per token of "
                         f"context); got metrics with {sorted(metrics)}")
    step_bytes = metrics["weights_bytes"] + b * (p + scenario["new_tokens"] / 2) * metrics["kv_cache_bytes_per_token"]
    achieved = step_bytes * metrics["decode_tokens_per_s"] / b / 1e9
    return {"decode_bytes_per_step": step_bytes, "decode_bandwidth_gbps": achieved,
            "roofline_fraction": achieved / ceilings["memory"]["bandwidth_gbps"], **out}
