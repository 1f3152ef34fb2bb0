"""bitsandbytes steps on the tiny Llama: LLM.int8 and 4-bit NF4/FP4, loaded quantized on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from optimize.errors import NotApplicable, RecipeError
from optimize.quantize import bnb as bnb_step  # importing registers "bnb-int8" and "bnb-nf4"
from optimize.quantize.bnb import BnbInt8, BnbNF4
from tests.optimize.helpers import agreement, linear_fp32_bytes, load_step, logits_of

NEW_TOKENS = 4
TINY_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is left alone
STEPS = {"int8": BnbInt8(), "nf4": BnbNF4(), "fp4": BnbNF4(quant_type="fp4")}
MIN_CORRELATION = {"int8": 0.999, "nf4": 0.98, "fp4": 0.96}  # measured on the tiny model: 0.9999, 0.987, 0.978


@pytest.fixture(scope="module")
def bnb_installed():
    for name in ("bitsandbytes", "accelerate"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name} (transformers loads bitsandbytes weights through accelerate)")


@pytest.fixture(scope="module")
def reference(tiny_ref, cache_dir):
    return load_step(tiny_ref, cache_dir, None)


@pytest.fixture(scope="module")
def states(bnb_installed, tiny_ref, cache_dir):
    return {kind: load_step(tiny_ref, cache_dir, step) for kind, step in STEPS.items()}


@pytest.mark.parametrize(("step", "message"), [
    (BnbInt8(threshold=-1.0), "bnb-int8.threshold must be >= 0"),
    (BnbInt8(threshold=float("nan")), "bnb-int8.threshold must be >= 0"),
    (BnbNF4(compute_dtype="int8"), "bnb-nf4.compute_dtype must be one of"),
    (BnbNF4(quant_type="int4"), "bnb-nf4.quant_type must be one of"),
])
def test_validate_rejects_bad_fields(step, message):
    with pytest.raises(RecipeError, match=message):
        step.validate()


def test_int8_loads_linear8bitlt_layers_with_int8_weights(states):
    import bitsandbytes as bnb
    import torch

    state = states["int8"]
    model = state.model
    [report] = state.reports
    expected = {"technique": "bnb-int8", "threshold": 6.0, "quantized_linears": TINY_LINEARS,
                "lm_head": "not quantized", "modules_touched": TINY_LINEARS, "modules_eligible": TINY_LINEARS}
    assert {k: report[k] for k in expected} == expected
    assert report["bytes_after"] < report["bytes_before"]
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, bnb.nn.Linear8bitLt) and up.weight.dtype == torch.int8 and up.weight.shape == (256, 128)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert "LLM.int8: activations cast to fp16 before int8 quantization" in state.labels


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_loads_linear4bit_layers_with_packed_weights(states, kind):
    import bitsandbytes as bnb
    import torch

    state = states[kind]
    model = state.model
    assert state.reports[0]["quant_type"] == kind and state.reports[0]["quantized_linears"] == TINY_LINEARS
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, bnb.nn.Linear4bit) and isinstance(up.weight, bnb.nn.Params4bit)
    assert up.weight.dtype == torch.uint8 and up.weight.numel() == 256 * 128 // 2  # two 4-bit codes per byte
    assert up.weight.quant_state.quant_type == kind
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_on_an_avx512_bf16_cpu_computes_in_bf16_and_says_so(states, kind):
    """bitsandbytes' AVX512-BF16 kernel casts fp32 activations to bf16: its products are bf16 ones."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    if not bnb_step._cpu_repacks_4bit():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes dequantizes to compute_dtype here")
    assert states[kind].labels == ["bitsandbytes 4-bit CPU kernel (AVX512-BF16): activations and products in bf16, "
                                   "not compute_dtype float32"]
    assert BnbNF4(quant_type=kind).matmul_dtype("float32", "cpu") == "bfloat16"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=generator) / 16
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type=kind)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
    layer = layer.to("cpu").eval()  # quantizes
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # before the kernel repacks it
    x = torch.randn(8, 256, generator=generator)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu and y.dtype == torch.float32
    exact, in_bf16 = x @ w.t(), (x.bfloat16() @ w.bfloat16().t()).float()
    scale = exact.abs().max().item()
    assert (y - exact).abs().max().item() > 1e-4 * scale  # fp32 arithmetic would agree to ~1e-6 of the scale
    assert (y - in_bf16).abs().max().item() < 2e-2 * scale  # bf16 rounding: a few parts in 1000


def test_4bit_matmul_dtype_is_compute_dtype_where_the_kernel_honours_it(monkeypatch):
    monkeypatch.setattr(bnb_step, "_cpu_repacks_4bit", lambda: True)
    assert BnbNF4().matmul_dtype("float32", "cpu") == "bfloat16"
    assert BnbNF4(compute_dtype="bfloat16").matmul_dtype("float32", "cpu") == "bfloat16"
    assert BnbNF4().matmul_dtype("float32", "cuda") == "float32"
    assert BnbNF4(compute_dtype="float16").matmul_dtype("float32", "cuda") == "float16"
    monkeypatch.setattr(bnb_step, "_cpu_repacks_4bit", lambda: False)
    assert BnbNF4().matmul_dtype("float32", "cpu") == "float32"


@pytest.mark.parametrize(("kind", "fraction_saved"), [("int8", 3 / 4), ("nf4", 7 / 8), ("fp4", 7 / 8)])
def test_quantized_linear_weights_shrink_as_their_bit_width_says(reference, states, kind, fraction_saved):
    from bench.metrics.memory import torch_weights_bytes

    saved = torch_weights_bytes(reference.model) - torch_weights_bytes(states[kind].model)
    ideal = fraction_saved * linear_fp32_bytes(reference.model)  # before scales and quantization maps
    assert 0.95 * ideal < saved <= ideal


@pytest.mark.parametrize("kind", list(STEPS))
def test_variant_generates_requested_tokens_close_to_reference(reference, states, tiny_prompts, kind):
    from bench.scenarios.generate import greedy_generate

    state = states[kind]
    assert greedy_generate(state, tiny_prompts, NEW_TOKENS).shape == (2, 16 + NEW_TOKENS)
    corr, top1 = agreement(logits_of(state, tiny_prompts), logits_of(reference, tiny_prompts))
    assert corr > MIN_CORRELATION[kind], corr
    if kind == "int8":  # 4-bit flips near-ties of the random model's flat logits too often for a top-1 bound
        assert top1 >= 0.9, top1


def test_nf4_with_fp16_compute_is_not_applicable_on_cpu(tiny_ref, cache_dir):
    with pytest.raises(NotApplicable, match="bnb-nf4 with fp16 compute needs CUDA"):
        load_step(tiny_ref, cache_dir, BnbNF4(compute_dtype="float16"))


@pytest.mark.parametrize(("missing", "hint"), [("bitsandbytes", "pip install 'bitsandbytes"),
                                               ("accelerate", "pip install 'accelerate")])
def test_missing_library_is_not_applicable_with_install_hint(tiny_ref, cache_dir, monkeypatch, missing, hint):
    if missing == "accelerate" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes, to reach the accelerate check")
    monkeypatch.setitem(sys.modules, missing, None)  # makes import fail and find_spec answer None
    with pytest.raises(NotApplicable, match=f"bnb-int8 needs {missing} .*{hint}"):
        load_step(tiny_ref, cache_dir, BnbInt8())


def test_loading_after_another_step_loaded_the_model_is_a_recipe_error(bnb_installed, tiny_ref):
    from optimize.state import VariantState

    state = VariantState(ref=tiny_ref, device="cpu", source_dir=Path(tiny_ref.path))
    state.model  # noqa: B018 - an earlier runtime step touched the model
    with pytest.raises(RecipeError, match="put it first among the runtime steps"):
        BnbNF4().apply(state)


def test_4bit_layer_shapes_the_avx512_bf16_kernel_cannot_tile_are_not_applicable(bnb_installed, tmp_path,
                                                                                   monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimize.models import resolve_model
    from optimize.state import VariantState

    # FFN width 688 = 16 x 43: not a multiple of the kernel's 32-row tiles (gate/up outputs)
    # nor of the 64-input absmax blocks (down input). Such CPUs repack at the first forward.
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=688, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ref = resolve_model(str(tmp_path))
    monkeypatch.setattr(bnb_step, "_cpu_repacks_4bit", lambda: True)
    state = VariantState(ref=ref, device="cpu", source_dir=Path(ref.path))
    with pytest.raises(NotApplicable, match=r"needs out_features % 32 == 0 and in_features % 64 == 0; "
                                            r"model\.layers\.0\.mlp\.gate_proj is \(out, in\) = \(688, 128\) "
                                            r"\(and 2 more layers\)"):
        BnbNF4().apply(state)


def test_module_import_does_not_import_bitsandbytes():
    heavy = "{'bitsandbytes', 'torch', 'transformers'}"
    code = f"import sys, optimize.quantize.bnb; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.parametrize("step", [BnbInt8(), BnbNF4(compute_dtype="bfloat16"), BnbNF4(compute_dtype="float16")],
                         ids=["int8", "nf4-bf16", "nf4-fp16"])
def test_variant_on_cuda_generates_close_to_reference(cuda_only, bnb_installed, tiny_ref, cache_dir, tiny_prompts,
                                                      step):
    from bench.scenarios.generate import greedy_generate

    state = load_step(tiny_ref, cache_dir, step, device="cuda")
    assert state.model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert state.reports[0]["quantized_linears"] == TINY_LINEARS
    assert greedy_generate(state, tiny_prompts, NEW_TOKENS).shape == (2, 16 + NEW_TOKENS)
    reference = load_step(tiny_ref, cache_dir, None, device="cuda")
    corr, _ = agreement(logits_of(state, tiny_prompts), logits_of(reference, tiny_prompts))
    assert corr > MIN_CORRELATION["int8" if isinstance(step, BnbInt8) else "nf4"], corr
