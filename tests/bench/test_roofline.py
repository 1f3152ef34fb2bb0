"""Roofline arithmetic: bytes and FLOPs per cell against measured ceilings."""

import dataclasses
import json

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
    metrics = {"weights_bytes": 1.0, "kv_cache_bytes_per_token": 0.0, "decode_tokens_per_s": 1.0,
               "prefill_tokens_per_s": 500.0}
    out = cell_roofline(metrics, {"batch_size": 1, "prompt_tokens": 64, "new_tokens": 2}, shape, CEILINGS, "bfloat16")
    # Hand count: 422,912 matmul params (2 x 147,456 per layer + 128 x 1000 head) x 2 FLOPs x 64 tokens,
    # plus causal attention 2 layers x 4 heads x (QK^T + PV: 2 x 2 x 32 x 64^2 / 2) = 2,097,152.
    expected = (2 * 422_912 * 64 + 2_097_152) * 500.0 / 64  # FLOPs of one prompt x prompts per second
    assert out["prefill_tflops"] == pytest.approx(expected / 1e12)
    assert out["prefill_flops_fraction"] == pytest.approx(expected / 0.1e12)
    assert out["roofline_ceilings"]["matmul_dtype"] == "float32"  # bf16 not measured: compared with fp32
    assert out["roofline_ceilings"]["matmul_tflops"] == pytest.approx(0.1)


class Tiny:
    """One layer, hidden 8, 2 query heads of dim 4 sharing 1 KV head, FFN 16, vocab 10."""

    num_hidden_layers = 1
    num_attention_heads = 2
    num_key_value_heads = 1
    hidden_size = 8
    intermediate_size = 16
    vocab_size = 10


def test_prefill_flops_of_a_tiny_attention_by_hand():
    shape = model_shape(Tiny)
    # q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x16, head 8x10 = 64+32+32+64+384+80 = 656 params
    assert shape == {"layers": 1, "heads": 2, "head_dim": 4, "matmul_params": 656}
    # batch 2, prompt 3: linear 2 x 656 x 6 tokens = 7872; attention per sequence and head: QK^T over the
    # causal half (3^2 / 2 pairs x 2 x 4 FLOPs) = 36, PV the same: 72 x 2 heads x 2 sequences = 288.
    assert prefill_flops(shape, batch=2, prompt=3) == 7872 + 288
    assert prefill_flops(shape, batch=1, prompt=1) == 2 * 656 + 2 * 2 * 4


def test_prefill_flops_match_torch_flop_counter_on_a_real_llama():
    """A second count: torch's FLOP counter over an eager Llama forward (it counts the full, unmasked
    QK^T and PV products, so the causal estimate is its linear part plus half its attention part)."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64,
                         attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    batch, prompt = 3, 20
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, prompt, dtype=torch.long), use_cache=False)
    counts = counter.get_flop_counts()
    rotary = sum(counts.get("LlamaForCausalLM.model.rotary_emb", {}).values())  # position angles: not in the model
    by_op = {str(op): n for op, n in counts["Global"].items()}
    linear = sum(n for op, n in by_op.items() if op.startswith(("aten.mm", "aten.addmm")))
    attention = sum(n for op, n in by_op.items() if op.startswith("aten.bmm")) - rotary
    assert linear > 0 and 0 <= rotary < attention / 100 and linear + attention + rotary == counter.get_total_flops()
    assert prefill_flops(model_shape(config), batch, prompt) == linear + attention / 2


def test_missing_kv_bytes_per_token_is_an_error_not_zero():
    metrics = {"weights_bytes": 1e9, "decode_tokens_per_s": 40.0, "prefill_tokens_per_s": 1000.0}
    with pytest.raises(ValueError, match=r"cell_roofline needs metrics\['kv_cache_bytes_per_token'\]"):
        cell_roofline(metrics, {"batch_size": 1, "prompt_tokens": 8, "new_tokens": 2}, model_shape(Config), CEILINGS,
                      "float32")


def test_onnx_embedding_not_found_labels_the_variant_and_counts_the_table(tmp_path):
    onnx = pytest.importorskip("onnx")
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from bench.cells import Cell
    from bench.metrics.roofline_cell import roofline_figures
    from bench.scenarios import GenerateScenario
    from optimize.recipe import Recipe

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, None)])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    state = SimpleNamespace(model=SimpleNamespace(config=config), backend="onnxruntime", onnx_dir=str(tmp_path),
                            labels=[])
    metrics = {"weights_bytes": 1e9, "kv_cache_bytes_per_token": 0.0, "decode_tokens_per_s": 10.0,
               "prefill_tokens_per_s": 1.0}
    cell = Cell(model="m", recipe=Recipe(name="onnx"), device="cpu",
                scenario=GenerateScenario(batch_size=1, prompt_tokens=8, new_tokens=2), ceilings=CEILINGS)
    out, _ = roofline_figures(state, cell, metrics)
    assert "embedding_bytes_not_read" not in out
    assert out["decode_bytes_per_step"] == 1e9  # the whole table counted as read, and said so:
    assert len(state.labels) == 1
    assert state.labels[0].startswith("decode bandwidth counts the whole input embedding table as read: "
                                      "no embedding table found in ")


def test_ceiling_arithmetic_with_scripted_times(monkeypatch):
    from bench.metrics import roofline

    monkeypatch.setattr(roofline, "_timed", lambda fn, device, reps: [0.5, 0.25, 1.0])
    cfg = roofline.RooflineConfig(copy_bytes_cpu=2**20, matmul_n_cpu=64, reps=3)
    bw = roofline.measure_bandwidth("cpu", cfg)
    # (read + write) 2 x 1 MiB over the median 0.5 s; best over 0.25 s
    assert bw == {"copy_bytes": 2**20, "bandwidth_gbps": 2 * 2**20 / 0.5 / 1e9,
                  "bandwidth_best_gbps": 2 * 2**20 / 0.25 / 1e9, "method": "tensor.copy_, (read + write) / median time"}
    mm = roofline.measure_matmul("cpu", "float32", cfg)
    assert mm == {"n": 64, "tflops": 2 * 64**3 / 0.5 / 1e12, "tflops_best": 2 * 64**3 / 0.25 / 1e12}


def test_timed_warms_up_once_then_times_each_rep():
    from bench.metrics.roofline import _timed

    calls = []
    times = _timed(lambda: calls.append(1), "cpu", 4)
    assert len(calls) == 5 and len(times) == 4 and all(t >= 0 for t in times)


def test_ceilings_measure_the_dtypes_the_device_runs(monkeypatch):
    from bench.metrics import roofline

    monkeypatch.setattr(roofline, "measure_bandwidth", lambda device, cfg: {"bandwidth_gbps": 1.0})
    monkeypatch.setattr(roofline, "measure_matmul", lambda device, dtype, cfg: {"tflops": 1.0, "dtype": dtype})
    monkeypatch.setattr(roofline, "measure_ort_matmul", lambda dtype, cfg: None)  # onnxruntime not installed
    monkeypatch.setattr(roofline, "cpu_has_bf16", lambda: False)
    cpu = roofline.measure_ceilings("cpu")
    assert cpu["device"] == "cpu" and cpu["memory"] == {"bandwidth_gbps": 1.0}
    assert cpu["matmul"] == {d: {"tflops": 1.0, "dtype": d, "backend": "torch", "by_backend": {"torch": 1.0}}
                             for d in ("float32", "int8")} and cpu["torch_threads"] >= 1
    monkeypatch.setattr(roofline, "cpu_has_bf16", lambda: True)
    assert list(roofline.measure_ceilings("cpu")["matmul"]) == ["float32", "bfloat16", "int8"]
    assert list(roofline.measure_ceilings("cuda")["matmul"]) == ["float32", "bfloat16", "float16", "int8"]


@pytest.mark.parametrize("flags, expected", [("fpu sse avx512f", False), ("fpu avx512_bf16", True),
                                             ("amx_tile amx_bf16", True)])
def test_cpu_has_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    import builtins

    from bench.metrics import roofline

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                        *a, **k))
    assert roofline.cpu_has_bf16() is expected


def test_cpu_has_bf16_without_cpuinfo_is_false(monkeypatch):
    import builtins

    from bench.metrics import roofline

    def missing(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(builtins, "open", missing)
    assert roofline.cpu_has_bf16() is False


def test_roofline_config_defaults():
    from bench.metrics.roofline import RooflineConfig

    cfg = RooflineConfig()
    assert (cfg.copy_bytes_cpu, cfg.copy_bytes_cuda, cfg.matmul_n_cpu, cfg.matmul_n_cuda, cfg.reps) == (
        512 * 2**20, 2 * 2**30, 2048, 8192, 7)


def test_cell_roofline_uses_the_measured_rate_of_the_compute_dtype_exactly():
    ceilings = {"memory": {"bandwidth_gbps": 20.0}, "matmul": {"float32": {"tflops": 0.1}, "bfloat16": {"tflops": 0.4}}}
    metrics = {"weights_bytes": 1e9, "kv_cache_bytes_per_token": 1000.0, "decode_tokens_per_s": 40.0,
               "prefill_tokens_per_s": 500.0}
    out = cell_roofline(metrics, {"batch_size": 4, "prompt_tokens": 100, "new_tokens": 20}, model_shape(Config),
                        ceilings, "bfloat16")
    step_bytes = 1e9 + 4 * 110 * 1000
    assert out["decode_bandwidth_gbps"] == pytest.approx(step_bytes * 10 / 1e9, rel=1e-12)
    # 400 prompt tokens: 2 FLOPs x 422,912 params each, plus causal attention of 2 layers x 4 sequences x
    # 4 heads x (2 x 32 x 100^2); over the 400 tokens, at 500 prompt tokens per second
    flops = (2 * 422_912 * 400 + 2 * 2 * 4 * 4 * 32 * 100**2) * 500.0 / 400
    assert out["prefill_tflops"] == pytest.approx(flops / 1e12, rel=1e-12)
    assert out["prefill_flops_fraction"] == pytest.approx(flops / 0.4e12, rel=1e-12)
    assert out["roofline_ceilings"] == {"bandwidth_gbps": 20.0, "matmul_tflops": pytest.approx(0.4, rel=1e-12),
                                        "matmul_dtype": "bfloat16", "matmul_backend": "torch"}


def test_missing_kv_bytes_message_is_exact():
    metrics = {"weights_bytes": 1.0, "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0}
    with pytest.raises(ValueError, match=r"^cell_roofline needs metrics\['kv_cache_bytes_per_token'\] \(KV cache "
                                         r"bytes read per token of context\); got metrics with \['decode_tokens"):
        cell_roofline(metrics, {"batch_size": 1, "prompt_tokens": 8, "new_tokens": 2}, model_shape(Config), CEILINGS,
                      "float32")


def test_timed_on_cuda_reads_event_pairs_in_seconds(monkeypatch):
    """CUDA emulated at torch's boundary: each event pair is 250 ms apart."""
    import torch

    from bench.metrics.roofline import _timed

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing is True
            self.t = None

        def record(self):
            Event.clock += 250.0
            self.t = Event.clock

        def elapsed_time(self, end):
            return end.t - self.t  # milliseconds, as CUDA events report

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    assert _timed(lambda: calls.append(1), "cuda", 3) == [0.25, 0.25, 0.25]
    assert len(calls) == 4


def test_timed_on_cpu_reads_perf_counter_differences(monkeypatch):
    from bench.metrics import roofline, timing

    # The warm-up call is timed too (and discarded): two marks, then two per timed call.
    now = iter([0, 1, 100_000_000_000, 100_500_000_000, 200_000_000_000, 202_000_000_000])
    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: next(now))
    assert roofline._timed(lambda: None, "cpu", 2) == [0.5, 2.0]


def test_ceilings_pass_the_device_and_config_on(monkeypatch):
    from bench.metrics import roofline

    seen = []
    monkeypatch.setattr(roofline, "measure_bandwidth", lambda device, cfg: seen.append(("bw", device, cfg)) or {})
    monkeypatch.setattr(roofline, "measure_matmul",
                        lambda device, dtype, cfg: seen.append((dtype, device, cfg)) or {"tflops": 1.0})
    monkeypatch.setattr(roofline, "measure_ort_matmul",
                        lambda dtype, cfg: seen.append(("ort", dtype, cfg)) or {"tflops": 1.0})
    monkeypatch.setattr(roofline, "cpu_has_bf16", lambda: False)
    cfg = roofline.RooflineConfig(reps=1)
    roofline.measure_ceilings("cpu", cfg)
    assert seen == [("bw", "cpu", cfg), ("float32", "cpu", cfg), ("ort", "float32", cfg), ("int8", "cpu", cfg),
                    ("ort", "int8", cfg)]
    seen.clear()
    roofline.measure_ceilings("cuda", cfg)  # ONNX Runtime's CPU kernels are no ceiling of a GPU
    assert [x[0] for x in seen] == ["bw", "float32", "bfloat16", "float16", "int8"]


def test_ceiling_timing_uses_the_shared_loop_one_warmup_then_exact_reps(monkeypatch):
    from bench.metrics import roofline, timing

    calls, loops = [], []
    real_repeat = timing.repeat
    monkeypatch.setattr(roofline, "repeat", lambda fn, cfg: loops.append(cfg) or real_repeat(fn, cfg))
    times = roofline._timed(lambda: calls.append(1), "cpu", 4)
    assert len(loops) == 1 and len(calls) == 5 and len(times) == 4  # 1 warm-up + 4 timed
    assert all(t >= 0 for t in times)
    for reps in (7, 25):  # past the loop's default repetition counts (5 and 20) in both directions
        calls.clear()
        assert len(roofline._timed(lambda: calls.append(1), "cpu", reps)) == reps and len(calls) == reps + 1
    now = iter(range(1000))  # slow calls (1 s each by the loop's clock): still exactly reps, budget or not
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(now)))
    assert len(roofline._timed(lambda: None, "cpu", 7)) == 7


class _Spy:
    """Stands in for ``_timed``: calls the timed function once, keeps what it returned, scripted times."""

    def __init__(self):
        self.seen = []

    def __call__(self, fn, device, reps):
        self.seen.append((fn(), device, reps))
        return [0.5] * reps


def test_bandwidth_times_a_float32_copy_of_the_configured_size_on_the_device(monkeypatch):
    import torch

    from bench.metrics import roofline

    spy = _Spy()
    monkeypatch.setattr(roofline, "_timed", spy)
    cfg = roofline.RooflineConfig(copy_bytes_cpu=4096, copy_bytes_cuda=8192, reps=3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # 4-byte elements whatever the default: the byte count assumes them
    try:
        assert roofline.measure_bandwidth("cpu", cfg)["copy_bytes"] == 4096
    finally:
        torch.set_default_dtype(default)
    (copied, device, reps), = spy.seen
    assert (device, reps) == ("cpu", 3)
    assert copied.dtype == torch.float32 and copied.shape == (1024,) and torch.equal(copied, torch.ones(1024))
    # CUDA's size and device, with tensors made on the CPU in CUDA's place:
    made = []
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda n, dtype, device: made.append((n, dtype, device)) or real_ones(n))
    assert roofline.measure_bandwidth("cuda", cfg)["copy_bytes"] == 8192
    assert made == [(2048, torch.float32, "cuda")] and spy.seen[1][1:] == ("cuda", 3)
    assert spy.seen[1][0].shape == (2048,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_times_an_n_by_n_product_in_the_dtype_on_the_device(monkeypatch, dtype):
    import torch

    from bench.metrics import roofline

    spy = _Spy()
    monkeypatch.setattr(roofline, "_timed", spy)
    cfg = roofline.RooflineConfig(matmul_n_cpu=8, matmul_n_cuda=16, reps=2)
    assert roofline.measure_matmul("cpu", dtype, cfg)["n"] == 8
    (product, device, reps), = spy.seen
    assert (device, reps) == ("cpu", 2) and product.shape == (8, 8) and product.dtype == getattr(torch, dtype)
    made = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device: made.append((shape, device)) or real_randn(*shape))
    assert roofline.measure_matmul("cuda", dtype, cfg)["n"] == 16
    assert made == [((16, 16), "cuda")] * 2 and spy.seen[1][0].shape == (16, 16) and spy.seen[1][1] == "cuda"


def test_model_shape_takes_an_explicit_head_dim_over_hidden_by_heads():
    class Wide(Config):  # Qwen3 / Gemma style: head_dim 64 while hidden 128 / 4 heads = 32
        head_dim = 64

    shape = model_shape(Wide)
    assert shape["head_dim"] == 64
    assert shape["matmul_params"] == 2 * (128 * 4 * 64 * 2 + 128 * 2 * 64 * 2 + 3 * 128 * 256) + 128 * 1000

    class NoHeadDim(Config):
        head_dim = None
        hidden_size = 130  # 130 // 4 = 32, as Llama computes it

    assert model_shape(NoHeadDim)["head_dim"] == 32 and isinstance(model_shape(NoHeadDim)["head_dim"], int)

    class NoGqa:  # a config without num_key_value_heads: every query head has its own K and V
        num_hidden_layers, num_attention_heads, hidden_size, intermediate_size, vocab_size = 1, 4, 64, 128, 10

    assert model_shape(NoGqa)["matmul_params"] == 64 * 64 * 2 + 64 * 64 * 2 + 3 * 64 * 128 + 64 * 10


def test_tera_scaling_is_exact():
    ceilings = {"memory": {"bandwidth_gbps": 10.0}, "matmul": {"float32": {"tflops": 2.0}}}
    metrics = {"weights_bytes": 1e9, "kv_cache_bytes_per_token": 0.0, "decode_tokens_per_s": 1.0,
               "prefill_tokens_per_s": 1.0}
    out = cell_roofline(metrics, {"batch_size": 1, "prompt_tokens": 1, "new_tokens": 2}, {"prefill_flops": 3e12},
                        ceilings, "float32")
    assert out["prefill_tflops"] == 3.0 and out["prefill_flops_fraction"] == 1.5
    assert out["roofline_ceilings"]["matmul_tflops"] == 2.0


def test_a_prefill_only_cell_has_prefill_figures_and_needs_no_decode_inputs():
    """The prefill sweep: FLOP/s against the matmul ceiling, no decode bandwidth (and no KV bytes needed)."""
    out = cell_roofline({"prefill_tokens_per_s": 2.0}, {"name": "prefill", "batch_size": 2, "prompt_tokens": 4,
                                                        "new_tokens": 1}, {"prefill_flops": 8e12}, CEILINGS, "float32")
    assert out == {"prefill_tflops": 2.0, "prefill_flops_fraction": pytest.approx(20.0),
                   "roofline_ceilings": {"bandwidth_gbps": 20.0, "matmul_tflops": pytest.approx(0.1),
                                         "matmul_dtype": "float32", "matmul_backend": "torch"}}


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Eager attention: torch's CPU sdpa kernel has no FLOP formula, so a counter around an sdpa
    # model would miss the attention products the count (and the GPU kernels) include.
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, max_position_embeddings=64, tie_word_embeddings=tie,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_counted_prefill_flops_are_what_generate_runs(tmp_path, tie):
    """The count a cell uses equals torch's FLOP counter around a real one-token generate() (its prefill):
    the LM head on the last position only. Counting it on every position would add 2 x h x vocab x b x (p - 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from optimize.introspect import prefill_flops

    model = _tiny_llama(tie)
    batch, prompt = 3, 20
    ids = torch.randint(2, 500, (batch, prompt))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    ran = counter.get_total_flops()
    counted = prefill_flops(model.config, batch, prompt, tmp_path, last_logits_only=True)
    # generate() computes the rotary angles once more than a forward does (640 FLOPs of 8.2M here)
    assert counted == pytest.approx(ran, rel=1e-3)
    every = prefill_flops(model.config, batch, prompt, tmp_path, last_logits_only=False)
    assert every - counted == 2 * 64 * 500 * batch * (prompt - 1)  # 3.6M: far outside the tolerance above


def test_a_cell_counts_its_prefill_as_its_backend_runs_it(tmp_path, monkeypatch):
    """A transformers variant: the last position's logits (generate's logits_to_keep=1); an ONNX graph: all of them."""
    from types import SimpleNamespace

    from bench.cells import Cell
    from bench.metrics.roofline_cell import roofline_figures
    from bench.scenarios import PrefillScenario
    from optimize import introspect
    from optimize.recipe import Recipe

    model = _tiny_llama(tie=True)
    c = Cell(model="m", recipe=Recipe(name="x"), device="cpu", cache_dir=str(tmp_path),
             scenario=PrefillScenario(batch_size=2, prompt_tokens=16), ceilings=CEILINGS)
    metrics = {"prefill_tokens_per_s": 32.0, "weights_bytes": 1, "kv_cache_bytes_per_token": 1.0}
    last = introspect.prefill_flops(model.config, 2, 16, tmp_path, last_logits_only=True)
    every = introspect.prefill_flops(model.config, 2, 16, tmp_path, last_logits_only=False)
    torch_state = SimpleNamespace(model=model, backend="torch", labels=[])
    out, how = roofline_figures(torch_state, c, metrics)
    assert out["prefill_tflops"] == pytest.approx(last / 1e12)  # 32 tokens/s = one prompt of 2 x 16 per second
    assert "last position only" in how and "roofline_fraction" not in out and torch_state.labels == []
    onnx_state = SimpleNamespace(model=SimpleNamespace(config=model.config), backend="onnxruntime", labels=[])
    out, how = roofline_figures(onnx_state, c, metrics)
    assert out["prefill_tflops"] == pytest.approx(every / 1e12) and "every position" in how


@pytest.mark.slow
def test_a_prefill_sweep_run_records_its_flop_fraction(tmp_path, cache_dir):
    """Through the command line, as a user runs it: a prefill cell's roofline is its FLOP rate, counted as run."""
    import json
    import subprocess
    import sys

    from bench.results import validate_record

    matrix = tmp_path / "prefill.toml"
    matrix.write_text('name = "p"\nmodels = ["synthetic:llama-tiny"]\nvariants = ["fp32"]\ndevices = ["cpu"]\n'
                      '[[scenarios]]\nname = "prefill"\nprompt_tokens = [32]\n'
                      '[measure]\nwarmup = 0\nmin_reps = 2\nmax_reps = 2\nbudget_s = 0\n[drift]\nenabled = false\n')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--out", str(out), "--quiet",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [rec] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    validate_record(rec)
    ceilings = json.loads((out / "run.json").read_text())["roofline"]["cpu"]
    m = rec["metrics"]
    assert rec["status"] == "ok" and "roofline_fraction" not in m and "decode_bandwidth_gbps" not in m
    assert m["prefill_tflops"] > 0
    assert m["prefill_flops_fraction"] == pytest.approx(m["prefill_tflops"] / ceilings["matmul"]["float32"]["tflops"])
    assert rec["method"]["roofline"].endswith("the LM head on the last position only (generate's logits_to_keep=1); "
                                              "prefill fraction of the fastest measured float32 matmul "
                                              f"({ceilings['matmul']['float32']['backend']}); the variant computes in "
                                              "float32 here")
    assert ceilings["torch_threads"] == rec["method"]["torch_threads"] == 1  # the ceiling of the cell's own threads


def test_stored_ceilings_are_reused_only_when_taken_on_the_cells_threads(tmp_path):
    from bench import orchestrate
    from bench.results import RUN, write_json_atomic

    stored = {"memory": {"bandwidth_gbps": 9.0}, "matmul": {"float32": {"tflops": 0.1}}, "torch_threads": 2}
    fresh = {"memory": {"bandwidth_gbps": 5.0}, "matmul": {"float32": {"tflops": 0.05}}, "torch_threads": 1}

    class Launcher:
        def __init__(self):
            self.jobs = []

        def run(self, jobs):
            self.jobs += jobs
            return [(spec, {"status": "ok", "ceilings": fresh}) for _, spec, _ in jobs]

    write_json_atomic(tmp_path / RUN, {"matrix": {"name": "m"}, "roofline": {"cpu": stored}})
    same = Launcher()
    assert orchestrate._ceilings(tmp_path, same, ["cpu"], lambda *a: None, threads=2) == {"cpu": stored}
    assert orchestrate._ceilings(tmp_path, same, ["cpu"], lambda *a: None, threads=0) == {"cpu": stored}
    assert same.jobs == []  # the default threads, or the ones they were taken on: reused
    other = Launcher()
    assert orchestrate._ceilings(tmp_path, other, ["cpu"], lambda *a: None, threads=1) == {"cpu": fresh}
    assert [(kind, spec) for kind, spec, _ in other.jobs] == [("roofline", {"device": "cpu", "threads": 1})]
    assert json.loads((tmp_path / RUN).read_text())["roofline"] == {"cpu": fresh}


def test_a_torch_cell_roofline_reads_its_dtype_embedding_and_flop_cache(tmp_path, monkeypatch):
    """bf16 weights: the bf16 matmul ceiling; the untied input table left out of the bytes; the count cached."""
    from types import SimpleNamespace

    import torch

    from bench.cells import Cell
    from bench.metrics.roofline_cell import roofline_figures
    from bench.scenarios import GenerateScenario
    from optimize import introspect
    from optimize.quantize import bnb
    from optimize.quantize.cast import Cast
    from optimize.recipe import Recipe

    model = _tiny_llama(tie=False).to(torch.bfloat16)
    ceilings = {"memory": {"bandwidth_gbps": 20.0},
                "matmul": {"float32": {"tflops": 0.1}, "bfloat16": {"tflops": 0.4}}}
    c = Cell(model="m", recipe=Recipe(name="bf16", steps=(Cast(dtype="bfloat16"),)), device="cpu",
             cache_dir=str(tmp_path),
             scenario=GenerateScenario(batch_size=2, prompt_tokens=16, new_tokens=4), ceilings=ceilings)
    metrics = {"prefill_tokens_per_s": 32.0, "decode_tokens_per_s": 8.0, "weights_bytes": 10**6,
               "kv_cache_bytes_per_token": 100.0}
    state = SimpleNamespace(model=model, backend="torch", labels=[])
    out, how = roofline_figures(state, c, metrics, None)
    embed = 500 * 64 * 2  # vocabulary x hidden x 2 bytes: decode reads one row of it per token
    assert out["embedding_bytes_not_read"] == embed
    step = 10**6 - embed + 2 * (16 + 4 / 2) * 100.0
    assert out["decode_bytes_per_step"] == step
    assert out["decode_bandwidth_gbps"] == pytest.approx(step * 4 / 1e9)  # 8 tok/s at batch 2: 4 steps/s
    assert out["roofline_ceilings"] == {"bandwidth_gbps": 20.0, "matmul_tflops": pytest.approx(0.4),
                                        "matmul_dtype": "bfloat16", "matmul_backend": "torch"}
    [entry] = (tmp_path / "flops").glob("*.json")  # counted into the cell's own cache
    flops = json.loads(entry.read_text())["prefill_flops"]
    assert flops == introspect.prefill_flops(model.config, 2, 16, tmp_path, last_logits_only=True)
    assert out["prefill_flops_fraction"] == pytest.approx(flops / 0.4e12)  # 32 tok/s: one 2 x 16 prompt a second
    assert how == "the LM head on the last position only (generate's logits_to_keep=1)" and state.labels == []
    fp32_state = SimpleNamespace(model=_tiny_llama(tie=False), backend="torch", labels=[])
    fp32 = dataclasses.replace(c, recipe=Recipe(name="fp32"))
    assert roofline_figures(fp32_state, fp32, metrics, None)[0]["roofline_ceilings"]["matmul_dtype"] == "float32"
    # bitsandbytes' 4-bit kernel on an AVX512-BF16 CPU computes in bf16 though its recipe says fp32
    monkeypatch.setattr(bnb, "_cpu_repacks_4bit", lambda: True)
    nf4 = dataclasses.replace(c, recipe=Recipe(name="nf4", steps=(bnb.BnbNF4(),)))
    assert roofline_figures(fp32_state, nf4, metrics, None)[0]["roofline_ceilings"]["matmul_dtype"] == "bfloat16"
    assert roofline_figures(fp32_state, dataclasses.replace(nf4, device="cuda"), metrics, None)[0][
        "roofline_ceilings"]["matmul_dtype"] == "float32"


def test_an_onnx_cell_roofline_takes_the_table_size_from_its_manifest(tmp_path):
    """The graph is never parsed (its directory does not even exist): the manifest's figure is used."""
    from types import SimpleNamespace

    from bench.cells import Cell
    from bench.metrics.roofline_cell import roofline_figures
    from bench.scenarios import GenerateScenario
    from optimize.recipe import Recipe

    config = _tiny_llama(tie=False).config
    # optimum's model is a GenerationMixin too; whatever it says, the exported graph computes every position
    state = SimpleNamespace(model=SimpleNamespace(config=config, _supports_logits_to_keep=lambda: True),
                            backend="onnxruntime", onnx_dir=str(tmp_path / "absent"), labels=[])
    c = Cell(model="m", recipe=Recipe(name="onnx"), device="cpu", cache_dir=str(tmp_path),
             scenario=GenerateScenario(batch_size=1, prompt_tokens=8, new_tokens=2), ceilings=CEILINGS)
    metrics = {"prefill_tokens_per_s": 8.0, "decode_tokens_per_s": 1.0, "weights_bytes": 10**6,
               "kv_cache_bytes_per_token": 0.0}
    out, how = roofline_figures(state, c, metrics, {"embedding_table_bytes": 4096})
    assert out["embedding_bytes_not_read"] == 4096 and out["decode_bytes_per_step"] == 10**6 - 4096
    assert out["roofline_ceilings"]["matmul_dtype"] == "float32"
    assert how == "the LM head on every position (the model computes every position's logits)"


def test_ceilings_events_name_the_device_and_its_rates_or_error(tmp_path):
    from bench import orchestrate
    from bench.results import RUN, write_json_atomic

    cpu = {"memory": {"bandwidth_gbps": 9.0}, "matmul": {"float32": {"tflops": 0.1}}, "torch_threads": 2}

    class Launcher:
        def run(self, jobs):
            return [(spec, {"status": "ok", "ceilings": cpu} if spec["device"] == "cpu"
                     else {"status": "failed", "error": "no device"}) for _, spec, _ in jobs]

    write_json_atomic(tmp_path / RUN, {"matrix": {"name": "m"}})
    events = []
    known = orchestrate._ceilings(tmp_path, Launcher(), ["cpu", "cuda"], lambda *e: events.append(e), 0)
    assert known == {"cpu": cpu}
    assert events == [("roofline", {"device": "cpu", "bandwidth_gbps": 9.0, "tflops": 0.1}),
                      ("roofline", {"device": "cuda", "error": "no device"})]
    assert json.loads((tmp_path / RUN).read_text()) == {"matrix": {"name": "m"}, "roofline": {"cpu": cpu}}


def test_a_torch_model_without_float_weights_is_held_to_the_fp32_ceiling(tmp_path):
    from types import SimpleNamespace

    import torch

    from bench.cells import Cell
    from bench.metrics.roofline_cell import roofline_figures
    from bench.scenarios import PrefillScenario
    from optimize.recipe import Recipe

    config = _tiny_llama(tie=True).config
    model = SimpleNamespace(config=config, parameters=lambda: iter([torch.zeros(4, dtype=torch.int8)]),
                            _supports_logits_to_keep=lambda: True)
    c = Cell(model="m", recipe=Recipe(name="int"), device="cpu", cache_dir=str(tmp_path),
             scenario=PrefillScenario(batch_size=1, prompt_tokens=8), ceilings=CEILINGS)
    out, _ = roofline_figures(SimpleNamespace(model=model, backend="torch", labels=[]), c,
                                {"prefill_tokens_per_s": 8.0, "weights_bytes": 4})
    assert out["roofline_ceilings"]["matmul_dtype"] == "float32" and out["prefill_flops_fraction"] > 0


def test_a_matmul_ceiling_is_the_fastest_back_end_and_says_which(monkeypatch):
    from bench.metrics import roofline

    rates = {"torch": {"n": 64, "tflops": 0.19, "tflops_best": 0.2}, "onnxruntime": {"n": 64, "tflops": 0.32,
                                                                                     "tflops_best": 0.33}}
    monkeypatch.setattr(roofline, "measure_matmul", lambda device, dtype, cfg: rates["torch"])
    monkeypatch.setattr(roofline, "measure_ort_matmul", lambda dtype, cfg: rates["onnxruntime"])
    assert roofline.matmul_ceiling("cpu", "float32") == {"n": 64, "tflops": 0.32, "tflops_best": 0.33,
                                                         "backend": "onnxruntime",
                                                         "by_backend": {"torch": 0.19, "onnxruntime": 0.32}}
    rates["torch"] = {"n": 64, "tflops": 1.7, "tflops_best": 1.8}
    assert roofline.matmul_ceiling("cpu", "int8")["backend"] == "torch"
    # bf16: ONNX Runtime's CPU provider has no fast kernel to measure; torch's alone
    assert roofline.matmul_ceiling("cpu", "bfloat16")["by_backend"] == {"torch": 1.7}

    def no_kernel(device, dtype, cfg):
        raise RuntimeError("_int_mm: no kernel for this device")

    monkeypatch.setattr(roofline, "measure_matmul", no_kernel)
    assert roofline.matmul_ceiling("cpu", "int8")["by_backend"] == {"onnxruntime": 0.32}
    monkeypatch.setattr(roofline, "measure_ort_matmul", lambda dtype, cfg: None)
    assert roofline.matmul_ceiling("cpu", "int8") is None  # nothing measured: no ceiling, not a wrong one

    def broken(dtype, cfg):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation\nmore")

    monkeypatch.setattr(roofline, "measure_ort_matmul", broken)
    monkeypatch.setattr(roofline, "measure_matmul", lambda device, dtype, cfg: rates["torch"])
    assert roofline.matmul_ceiling("cpu", "float32") == {  # torch's stands; why ONNX Runtime's is missing is kept
        "n": 64, "tflops": 1.7, "tflops_best": 1.8, "backend": "torch", "by_backend": {"torch": 1.7},
        "errors": {"onnxruntime": "RuntimeError: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
                                  "implementation"}}


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_real_matmul_ceilings_of_torch_and_onnx_runtime_on_a_small_matrix(dtype):
    pytest.importorskip("onnxruntime")
    from bench.metrics import roofline

    cfg = roofline.RooflineConfig(matmul_n_cpu=64, reps=2)
    for figures in (roofline.measure_matmul("cpu", dtype, cfg), roofline.measure_ort_matmul(dtype, cfg)):
        assert figures["n"] == 64 and 0 < figures["tflops"] <= figures["tflops_best"]


def test_ort_matmul_rate_is_two_n_cubed_over_the_median_time(monkeypatch):
    pytest.importorskip("onnxruntime")
    from bench.metrics import roofline

    monkeypatch.setattr(roofline, "_timed", lambda fn, device, reps: [fn() and 0.5, 0.25, 1.0])
    cfg = roofline.RooflineConfig(matmul_n_cpu=32, reps=3)
    assert roofline.measure_ort_matmul("int8", cfg) == {"n": 32, "tflops": 2 * 32**3 / 0.5 / 1e12,
                                                        "tflops_best": 2 * 32**3 / 0.25 / 1e12}


def test_an_int8_recipe_is_divided_by_the_int8_ceiling_and_gets_no_fraction_without_one():
    metrics = {"prefill_tokens_per_s": 1.0}
    scenario = {"name": "prefill", "batch_size": 1, "prompt_tokens": 1, "new_tokens": 1}
    ceilings = {"memory": {"bandwidth_gbps": 20.0},
                "matmul": {"float32": {"tflops": 0.2}, "int8": {"tflops": 1.6, "backend": "onnxruntime"}}}
    out = cell_roofline(metrics, scenario, {"prefill_flops": 0.8e12}, ceilings, "int8")
    assert out["prefill_flops_fraction"] == pytest.approx(0.5)
    assert out["roofline_ceilings"] == {"bandwidth_gbps": 20.0, "matmul_tflops": 1.6, "matmul_dtype": "int8",
                                        "matmul_backend": "onnxruntime"}
    del ceilings["matmul"]["int8"]
    out = cell_roofline(metrics, scenario, {"prefill_flops": 0.8e12}, ceilings, "int8")
    assert "prefill_flops_fraction" not in out and out["prefill_tflops"] == pytest.approx(0.8)
    assert out["roofline_ceilings"] == {"bandwidth_gbps": 20.0}
    # a float dtype without its own ceiling is emulated in fp32 arithmetic: fp32's rate bounds it
    assert cell_roofline(metrics, scenario, {"prefill_flops": 0.8e12}, ceilings, "float16")["roofline_ceilings"][
        "matmul_dtype"] == "float32"


def test_int8_is_timed_on_torchs_integer_kernel_in_both_layouts_of_its_second_operand(monkeypatch):
    import torch

    from bench.metrics import roofline

    seen, seconds = [], {True: 1.0, False: 0.5}  # row-major second operand 1 s a call, column-major 0.5 s
    real = torch._int_mm

    def int_mm(a, b):
        seen.append((a.dtype, b.dtype, tuple(a.shape), a.is_contiguous(), b.is_contiguous(), b.t().is_contiguous()))
        return real(a, b)

    def timed(fn, device, reps):
        fn()
        return [seconds[seen[-1][4]]] * reps

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    monkeypatch.setattr(roofline, "_timed", timed)
    out = roofline.measure_matmul("cpu", "int8", roofline.RooflineConfig(matmul_n_cpu=32, reps=2))
    row = (torch.int8, torch.int8, (32, 32), True, True, False)
    assert seen == [row, (*row[:4], False, True)]  # int8 x int8; the second operand row- then column-major
    assert out == {"n": 32, "tflops": 2 * 32**3 / 0.5 / 1e12, "tflops_best": 2 * 32**3 / 0.5 / 1e12,
                   "b_layout": "column-major"}
    seconds.update({True: 0.25})
    seen.clear()
    assert roofline.measure_matmul("cpu", "int8", roofline.RooflineConfig(matmul_n_cpu=32, reps=2))["b_layout"] == \
        "row-major"


@pytest.mark.parametrize(("dtype", "op", "a_type"), [("float32", "MatMul", "float32"),
                                                     ("int8", "MatMulInteger", "uint8")])
def test_onnx_runtimes_ceiling_runs_its_kernel_on_the_cells_threads_on_the_cpu(monkeypatch, dtype, op, a_type):
    """The session gets torch's thread count (the cells' ONNX sessions get the same) and the CPU provider; the
    graph is one product whose second operand is a constant, as a model's weights are."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    import torch

    from bench.metrics import roofline

    sessions = []
    real = ort.InferenceSession

    def recording(model_bytes, options, providers):
        sessions.append((onnx.load_from_string(model_bytes), options.intra_op_num_threads, providers))
        return real(model_bytes, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    roofline.measure_ort_matmul(dtype, roofline.RooflineConfig(matmul_n_cpu=16, reps=1))
    [(model, threads, providers)] = sessions
    assert threads == 1 and providers == ["CPUExecutionProvider"]
    assert [n.op_type for n in model.graph.node] == [op]
    assert [i.name for i in model.graph.input] == ["a"] and [i.name for i in model.graph.initializer] == ["b"]
    assert onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type).name == a_type
