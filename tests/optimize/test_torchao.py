"""torchao step on the tiny Llama: int8 schemes on the CPU, int4 weight-only on CUDA only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from optimize.errors import NotApplicable, RecipeError
from optimize.quantize.torchao import (  # importing registers "torchao"
    CUDA_SMALL_M_FALLBACK,
    INT_MM_PROBE_ROWS,
    TorchAO,
    int_mm_refused_rows,
    small_product_label,
)
from tests.optimize.helpers import agreement, linear_fp32_bytes, load_step, logits_of

INT8_SCHEMES = ("int8-weight-only", "int8-dynamic")
NEW_TOKENS = 4
TINY_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is left alone


@pytest.fixture(scope="module")
def reference(tiny_ref, cache_dir):
    return load_step(tiny_ref, cache_dir, None)


@pytest.fixture(scope="module")
def int8_states(tiny_ref, cache_dir):
    return {scheme: load_step(tiny_ref, cache_dir, TorchAO(scheme=scheme)) for scheme in INT8_SCHEMES}


@pytest.mark.parametrize(("fields", "message"), [
    ({"scheme": "int3"}, "torchao.scheme must be one of"),
    ({"scheme": "int4-weight-only", "group_size": 100}, "torchao.group_size must be one of"),
])
def test_validate_rejects_unknown_scheme_and_group_size(fields, message):
    with pytest.raises(RecipeError, match=message):
        TorchAO(**fields).validate()


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_int8_schemes_replace_every_linear_but_lm_head_with_int8_tensors(int8_states, scheme):
    import torch
    from torchao.quantization import Int8Tensor

    state = int8_states[scheme]
    model = state.model
    [report] = state.reports
    expected = {"technique": "torchao", "scheme": scheme, "quantized_linears": TINY_LINEARS,
                "unquantized_linears": 0, "lm_head": "not quantized", "modules_touched": TINY_LINEARS,
                "modules_eligible": TINY_LINEARS}
    assert {k: report[k] for k in expected} == expected
    assert report["bytes_after"] < report["bytes_before"]
    up = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(up, Int8Tensor) and up.qdata.dtype == torch.int8 and up.qdata.shape == (256, 128)
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_int8_schemes_cut_linear_weight_bytes_by_about_three_quarters(reference, int8_states, scheme):
    from bench.metrics.memory import torch_weights_bytes

    saved = torch_weights_bytes(reference.model) - torch_weights_bytes(int8_states[scheme].model)
    ideal = 0.75 * linear_fp32_bytes(reference.model)  # 4 -> 1 byte per weight, before per-row scales
    assert 0.95 * ideal < saved <= ideal


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_int8_schemes_generate_requested_tokens_close_to_reference(reference, int8_states, tiny_prompts, scheme):
    from bench.scenarios.generate import greedy_generate

    state = int8_states[scheme]
    out = greedy_generate(state, tiny_prompts, NEW_TOKENS)
    assert out.shape == (2, 16 + NEW_TOKENS)
    corr, top1 = agreement(logits_of(state, tiny_prompts), logits_of(reference, tiny_prompts))
    assert corr > 0.999 and top1 >= 0.9, (corr, top1)


def test_int4_weight_only_is_not_applicable_on_cpu(tiny_ref, cache_dir):
    with pytest.raises(NotApplicable, match="torchao int4 weight-only needs CUDA: torchao 0.18 has no CPU kernel"):
        load_step(tiny_ref, cache_dir, TorchAO(scheme="int4-weight-only"))


def test_module_import_does_not_import_torchao():
    code = "import sys, optimize.quantize.torchao; print(sorted({'torch', 'torchao'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_int8_schemes_on_cuda_generate_close_to_reference(cuda_only, tiny_ref, cache_dir, tiny_prompts, scheme):
    from bench.scenarios.generate import greedy_generate

    state = load_step(tiny_ref, cache_dir, TorchAO(scheme=scheme), device="cuda")
    assert greedy_generate(state, tiny_prompts, NEW_TOKENS).shape == (2, 16 + NEW_TOKENS)
    reference = load_step(tiny_ref, cache_dir, None, device="cuda")
    corr, _ = agreement(logits_of(state, tiny_prompts), logits_of(reference, tiny_prompts))
    assert corr > 0.999, corr
    fallback = [label for label in state.labels if label.startswith(CUDA_SMALL_M_FALLBACK)]
    refused = int_mm_refused_rows("cuda")
    assert 1 in refused  # torch's own check: more than 16 rows
    assert fallback == ([small_product_label(refused)] if scheme == "int8-dynamic" else [])


@pytest.mark.cuda
def test_the_int8_dynamic_label_names_the_row_counts_the_cuda_int8_kernel_refuses(cuda_only):
    import torch

    refused = int_mm_refused_rows("cuda")
    b = torch.ones(64, 64, dtype=torch.int8, device="cuda")
    for m in INT_MM_PROBE_ROWS:
        a = torch.ones(m, 64, dtype=torch.int8, device="cuda")
        if m in refused:
            with pytest.raises(RuntimeError):
                torch._int_mm(a, b)
        else:
            assert torch.equal(torch._int_mm(a, b), torch.full((m, 64), 64, dtype=torch.int32, device="cuda"))
    assert set(refused) >= {1, 2, 4, 8, 16}  # torch's own check: more than 16 rows
    assert 128 not in refused  # a prefill's product: the kernel the variant exists for
    print("torch._int_mm refuses", refused, "of", INT_MM_PROBE_ROWS)


def test_the_probe_lists_the_rows_the_int8_kernel_refused(monkeypatch):
    import torch

    def int_mm(a, b):
        if a.shape[0] <= 16 or a.shape[0] % 8:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    assert int_mm_refused_rows("cpu") == [1, 2, 4, 8, 16, 17]
    assert small_product_label([1, 17]).startswith(f"{CUDA_SMALL_M_FALLBACK} 1, 17 rows here (probed: 1, 2, 4, ")


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_on_the_cpu_no_small_product_fallback_is_claimed(int8_states, scheme):
    assert not any(label.startswith(CUDA_SMALL_M_FALLBACK) for label in int8_states[scheme].labels)


@pytest.fixture(scope="module")
def wide_ref(tmp_path_factory, cache_dir):
    """A one-layer Llama whose every linear layer has a multiple of 1024 inputs: tinygemm pads none of them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimize.models import resolve_model

    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return resolve_model(str(path), cache_dir)


@pytest.mark.cuda
def test_int4_weight_only_on_cuda_packs_tinygemm_weights_in_bf16(cuda_only, tiny_ref, wide_ref, cache_dir):
    import torch
    from torchao.quantization import Int4TilePackedTo4dTensor

    from bench.prompts import prompt_ids
    from bench.scenarios.generate import greedy_generate

    if torch.cuda.get_device_capability()[0] < 8:
        with pytest.raises(NotApplicable, match="compute capability >= 8.0"):
            load_step(tiny_ref, cache_dir, TorchAO(scheme="int4-weight-only"), device="cuda")
        pytest.skip("tinygemm int4 needs compute capability >= 8.0 (NotApplicable checked)")
    # the tiny model's 128-input layers would be padded to 1024 inputs: bigger than bf16, refused
    with pytest.raises(NotApplicable, match="pads each layer's inputs to a multiple of 1024.*with 128"):
        load_step(tiny_ref, cache_dir, TorchAO(scheme="int4-weight-only", group_size=64), device="cuda")
    state = load_step(wide_ref, cache_dir, TorchAO(scheme="int4-weight-only", group_size=64), device="cuda")
    [report] = state.reports
    assert report["quantized_linears"] == 7 and report["bytes_after"] < report["bytes_before"], report
    assert isinstance(state.model.model.layers[0].mlp.up_proj.weight, Int4TilePackedTo4dTensor)
    assert state.model.lm_head.weight.dtype == torch.bfloat16
    assert any("bf16" in label for label in state.labels)
    prompts, _ = prompt_ids(wide_ref, 512, 2, 16)
    assert greedy_generate(state, prompts, NEW_TOKENS).shape == (2, 16 + NEW_TOKENS)
    reference = load_step(wide_ref, cache_dir, None, device="cuda")
    corr, _ = agreement(logits_of(state, prompts), logits_of(reference, prompts))
    assert corr > 0.97, corr
