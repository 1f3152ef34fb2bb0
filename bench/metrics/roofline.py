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


def measure_matmul(device: str, dtype: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any]:
    """Dense matmul rate: 2 n^3 FLOPs over the median time."""
    import torch

    n = cfg.matmul_n_cuda if device == "cuda" else cfg.matmul_n_cpu
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    times = _timed(lambda: a @ b, device, cfg.reps)
    return {"n": n, "tflops": 2 * n**3 / statistics.median(times) / 1e12,
            "tflops_best": 2 * n**3 / min(times) / 1e12}


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX); without it bf16 matmuls are emulated."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_ceilings(device: str, cfg: RooflineConfig = RooflineConfig()) -> dict[str, Any]:
    """Bandwidth and matmul rates: fp32 always; bf16 and fp16 on CUDA; bf16 on CPUs with native bf16."""
    import torch

    dtypes = ["float32"]
    if device == "cuda":
        dtypes += ["bfloat16", "float16"]
    elif cpu_has_bf16():
        dtypes.append("bfloat16")
    out: dict[str, Any] = {"device": device, "memory": measure_bandwidth(device, cfg), "matmul": {}}
    for dtype in dtypes:
        out["matmul"][dtype] = measure_matmul(device, dtype, cfg)
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
    peak_flops = ceilings["matmul"].get(compute_dtype, ceilings["matmul"]["float32"])["tflops"] * 1e12
    out: dict[str, Any] = {
        "prefill_tflops": flops / 1e12,
        "prefill_flops_fraction": flops / peak_flops,
        "roofline_ceilings": {"bandwidth_gbps": ceilings["memory"]["bandwidth_gbps"],
                              "matmul_tflops": peak_flops / 1e12,
                              "matmul_dtype": compute_dtype if compute_dtype in ceilings["matmul"] else "float32"},
    }
    if "decode_tokens_per_s" not in metrics:
        return out
    if "kv_cache_bytes_per_token" not in metrics:  # a silent 0 would leave the KV cache out of every step
        raise ValueError("cell_roofline needs metrics['kv_cache_bytes_per_token'] (KV cache bytes read per token of "
                         f"context); got metrics with {sorted(metrics)}")
    step_bytes = metrics["weights_bytes"] + b * (p + scenario["new_tokens"] / 2) * metrics["kv_cache_bytes_per_token"]
    achieved = step_bytes * metrics["decode_tokens_per_s"] / b / 1e9
    return {"decode_bytes_per_step": step_bytes, "decode_bandwidth_gbps": achieved,
            "roofline_fraction": achieved / ceilings["memory"]["bandwidth_gbps"], **out}
