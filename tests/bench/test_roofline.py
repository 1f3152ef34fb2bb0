"""Roofline arithmetic: bytes and FLOPs per cell against measured ceilings."""

import pytest

from bench.metrics.roofline import cell_roofline, model_shape, prefill_flops


class Config:
    num_hidden_layers = 2
    num_attention_heads = 4
    num_key_value_heads = 2
    hidden_size = 128
    intermediate_size = 256
    vocab_size = 1000
    head_dim = 32


CEILINGS = {"memory": {"bandwidth_gbps": 20.0}, "matmul": {"float32": {"tflops": 0.1}}}


def test_model_shape_counts_matmul_parameters():
    shape = model_shape(Config)
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256
    assert shape["matmul_params"] == 2 * per_layer + 128 * 1000


def test_decode_bandwidth_counts_weights_once_per_step_and_kv_per_sequence():
    metrics = {"weights_bytes": 1e9, "kv_cache_bytes_per_token": 1000.0, "decode_tokens_per_s": 40.0,
               "prefill_tokens_per_s": 1000.0}
    scenario = {"batch_size": 4, "prompt_tokens": 100, "new_tokens": 20}
    out = cell_roofline(metrics, scenario, model_shape(Config), CEILINGS, "float32")
    step_bytes = 1e9 + 4 * (100 + 10) * 1000  # weights + batch x mean context x KV bytes/token
    assert out["decode_bytes_per_step"] == pytest.approx(step_bytes)
    assert out["decode_bandwidth_gbps"] == pytest.approx(step_bytes * 10 / 1e9)  # 40 tok/s / batch 4 = 10 steps/s
    assert out["roofline_fraction"] == pytest.approx(out["decode_bandwidth_gbps"] / 20.0)


def test_prefill_flops_fraction_uses_measured_matmul_rate():
    shape = model_shape(Config)
    metrics = {"weights_bytes": 1.0, "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 500.0}
    out = cell_roofline(metrics, {"batch_size": 1, "prompt_tokens": 64, "new_tokens": 2}, shape, CEILINGS, "bfloat16")
    expected = prefill_flops(shape, 1, 64) * 500.0 / 64
    assert out["prefill_tflops"] == pytest.approx(expected / 1e12)
    assert out["prefill_flops_fraction"] == pytest.approx(expected / 0.1e12)
    assert out["roofline_ceilings"]["matmul_dtype"] == "float32"  # bf16 not measured: compared with fp32
