"""Pruning on the tiny Llama: magnitude, 2:4 semi-structured, structured (FFN neurons, heads)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from optimize.errors import RecipeError  # noqa: E402
from optimize.prune.magnitude import MagnitudePrune, prunable_linears  # noqa: E402
from optimize.prune.semi_structured import SemiStructured24, SparseKernels24, holds_2of4, mask_2of4  # noqa: E402
from optimize.prune.structured import StructuredPrune, kept_width  # noqa: E402
from optimize.recipe import Recipe  # noqa: E402
from optimize.store import VariantStore, load_variant  # noqa: E402

NEW_TOKENS = 4


def build(ref, cache_dir, name, *steps, device="cpu"):
    return load_variant(ref, Recipe(name=name, steps=steps), device, VariantStore(cache_dir))


def generates(state, prompts) -> bool:
    from bench.scenarios.generate import greedy_generate

    out = greedy_generate(state, prompts, NEW_TOKENS)
    return out.shape == (prompts.shape[0], prompts.shape[1] + NEW_TOKENS)


# --- magnitude ---------------------------------------------------------------------------------

def test_magnitude_layer_scope_zeroes_half_of_each_linear(tiny_ref, cache_dir):
    state, artifact = build(tiny_ref, cache_dir, "mag-layer", MagnitudePrune(sparsity=0.5, scope="layer"))
    for name, module in prunable_linears(state.model):
        assert int((module.weight == 0).sum()) == module.weight.numel() // 2, name  # every width here is even
    assert state.model.lm_head.weight.count_nonzero() == state.model.lm_head.weight.numel()
    assert artifact.manifest["reports"][0]["sparsity_achieved"] == 0.5


def test_magnitude_global_scope_hits_the_global_target(tiny_ref, cache_dir):
    state, artifact = build(tiny_ref, cache_dir, "mag-global", MagnitudePrune(sparsity=0.5, scope="global"))
    zeros = sum(int((m.weight == 0).sum()) for _, m in prunable_linears(state.model))
    total = sum(m.weight.numel() for _, m in prunable_linears(state.model))
    assert zeros == total // 2
    assert artifact.manifest["reports"][0]["scope"] == "global"


def test_magnitude_validate_rejects_bad_fields():
    with pytest.raises(RecipeError, match="sparsity"):
        MagnitudePrune(sparsity=1.0).validate()
    with pytest.raises(RecipeError, match="scope"):
        MagnitudePrune(scope="row").validate()


# --- 2:4 semi-structured -------------------------------------------------------------------------

def test_mask_2of4_keeps_the_two_largest_of_each_group():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -2.0, 1.0]])
    assert mask_2of4(w).tolist() == [[False, True, True, False, True, False, True, False]]
    assert holds_2of4(w * mask_2of4(w))
    assert not holds_2of4(w)


def test_2of4_pattern_holds_in_every_group_and_model_generates(tiny_ref, cache_dir, tiny_prompts):
    state, artifact = build(tiny_ref, cache_dir, "p24", SemiStructured24())
    report = artifact.manifest["reports"][0]
    assert report["pattern_holds"] is True
    assert report["sparsity_achieved"] == pytest.approx(0.5, abs=0.001)
    for name, module in prunable_linears(state.model):  # reloaded from the saved safetensors
        groups = (module.weight != 0).reshape(module.out_features, -1, 4).sum(-1)  # (out, in/4)
        assert int(groups.max()) <= 2, name
    assert generates(state, tiny_prompts)


def test_sparse_kernels_on_cpu_label_masked_dense_honestly(tiny_ref, cache_dir, tiny_prompts):
    state, _ = build(tiny_ref, cache_dir, "p24-kernels", SemiStructured24(), SparseKernels24())
    report = state.reports[-1]
    assert report["sparse_kernels"] is False
    assert report["reason"] == "no semi-structured sparse kernels on cpu"
    assert "2:4 sparsity as masked dense weights: no semi-structured sparse kernels on cpu" in state.labels
    assert all(type(m.weight) is torch.nn.Parameter for _, m in prunable_linears(state.model))
    assert generates(state, tiny_prompts)


@pytest.mark.parametrize(("capability", "cusparselt", "force_cutlass", "reason"), [
    ((9, 0), False, False, "NVIDIA H200 (compute capability 9.0) without cuSPARSELt: torch's CUTLASS 2:4 kernels "
                           "run on 8.x only"),
    ((9, 0), True, True, "NVIDIA H200 (compute capability 9.0) without cuSPARSELt: torch's CUTLASS 2:4 kernels "
                         "run on 8.x only"),
    ((7, 5), True, False, "NVIDIA H200 (compute capability 7.5 < 8.0)"),
    ((9, 0), True, False, None),
    ((8, 6), False, False, None),
])
def test_sparse_kernels_are_missing_where_torch_has_none_for_the_gpu(monkeypatch, capability, cusparselt,
                                                                     force_cutlass, reason):
    """On an H200, torch's CUTLASS kernels fail at the first product ("Supported only on GPUs with compute
    capability 8.x"): without cuSPARSELt, or with CUTLASS forced, the step keeps masked dense weights."""
    from types import SimpleNamespace

    from torch.sparse import SparseSemiStructuredTensor

    from optimize.prune import semi_structured

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", force_cutlass)
    assert semi_structured._no_kernels_reason(SimpleNamespace(device="cuda")) == reason


def test_sparse_kernels_on_an_h200_without_cusparselt_keep_masked_dense_weights(tiny_ref, cache_dir, monkeypatch):
    """The step itself on such a GPU: the weights stay dense tensors and the variant says why."""
    state, _ = build(tiny_ref, cache_dir, "p24-h200", SemiStructured24())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    state.device = "cuda"  # chosen, as a cell on that GPU would; the kernel step decides before any product
    report = SparseKernels24().apply(state)
    assert report["sparse_kernels"] is False and "without cuSPARSELt" in report["reason"]
    assert f"2:4 sparsity as masked dense weights: {report['reason']}" in state.labels
    assert all(type(m.weight) is torch.nn.Parameter for _, m in prunable_linears(state.model))


def test_sparse_kernels_without_2of4_weights_is_a_recipe_error(tiny_ref, cache_dir):
    with pytest.raises(RecipeError, match="prune-2of4 before it"):
        build(tiny_ref, cache_dir, "kernels-alone", SparseKernels24())


@pytest.mark.cuda
def test_sparse_kernels_convert_weights_on_ampere_or_later(tiny_ref, cache_dir, tiny_prompts):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparse kernels need compute capability >= 8.0")
    from torch.sparse import SparseSemiStructuredTensor

    from optimize.quantize.cast import Cast

    state, _ = build(tiny_ref, cache_dir, "p24-cuda", SemiStructured24(), Cast(dtype="float16"), SparseKernels24(),
                     device="cuda")
    report = state.reports[-1]
    assert report["sparse_kernels"] is True, report
    assert report["layers_converted"] == 2 * 7 and report["layers_skipped"] == 0  # q k v o gate up down per layer
    assert all(isinstance(m.weight, SparseSemiStructuredTensor) for _, m in prunable_linears(state.model))
    assert generates(state, tiny_prompts)


# --- structured ----------------------------------------------------------------------------------

def test_kept_width_rounds_to_the_multiple():
    assert kept_width(256, 0.25, 64) == 192
    assert kept_width(11008, 0.3, 64) == 7680  # 7705.6 -> nearest multiple of 64


def test_structured_ffn_shrinks_matrices_and_reloads_with_plain_transformers(tiny_ref, cache_dir, tiny_prompts):
    from transformers import AutoModelForCausalLM

    from optimize.state import VariantState

    state, artifact = build(tiny_ref, cache_dir, "ffn-25", StructuredPrune(ratio=0.25))
    report = artifact.manifest["reports"][0]
    assert (report["intermediate_size_before"], report["intermediate_size_after"]) == (256, 192)
    assert report["parameters_after"] < report["parameters_before"]
    # 2 layers x 3 matrices x 128 x 64 removed neurons
    assert report["parameters_before"] - report["parameters_after"] == 2 * 3 * 128 * 64
    plain = AutoModelForCausalLM.from_pretrained(artifact.path)
    assert plain.config.intermediate_size == 192
    for layer in plain.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (192, 128)
        assert layer.mlp.up_proj.weight.shape == (192, 128)
        assert layer.mlp.down_proj.weight.shape == (128, 192)
    assert generates(VariantState(ref=tiny_ref, device="cpu", source_dir=artifact.path, _model=plain.eval()),
                     tiny_prompts)
    assert generates(state, tiny_prompts)


@pytest.mark.parametrize("importance", ["weight", "activation"])
def test_structured_heads_keep_gqa_consistent_and_load(tiny_ref, cache_dir, tiny_prompts, importance):
    from transformers import AutoModelForCausalLM

    step = StructuredPrune(ratio=0.25, heads_ratio=0.5, importance=importance)
    state, artifact = build(tiny_ref, cache_dir, f"ffn-heads-{importance}", step)
    report = artifact.manifest["reports"][0]
    assert (report["num_key_value_heads_before"], report["num_key_value_heads_after"]) == (2, 1)
    assert (report["num_attention_heads_before"], report["num_attention_heads_after"]) == (4, 2)
    assert any("calibrated on the evaluation text" in label for label in state.labels) == (importance == "activation")
    plain = AutoModelForCausalLM.from_pretrained(artifact.path)
    config = plain.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 32)
    assert config.hidden_size == 128
    for layer in plain.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (2 * 32, 128)
        assert attn.k_proj.weight.shape == (1 * 32, 128)
        assert attn.v_proj.weight.shape == (1 * 32, 128)
        assert attn.o_proj.weight.shape == (128, 2 * 32)
        assert layer.mlp.down_proj.weight.shape == (128, 192)
    assert generates(state, tiny_prompts)


@pytest.mark.parametrize("fields, match", [
    ({"ratio": 0.0}, "ratio"),
    ({"ratio": 1.0}, "ratio"),
    ({"heads_ratio": 1.0}, "heads_ratio"),
    ({"heads_ratio": -0.1}, "heads_ratio"),
    ({"importance": "gradient"}, "importance"),
    ({"multiple_of": 0}, "multiple_of"),
])
def test_structured_validate_rejects_bad_fields(fields, match):
    with pytest.raises(RecipeError, match=match):
        StructuredPrune(**fields).validate()


def test_structured_ratio_that_rounds_to_nothing_is_not_applicable(tiny_ref, cache_dir):
    from optimize.errors import NotApplicable

    with pytest.raises(NotApplicable, match="keeps all"):
        build(tiny_ref, cache_dir, "ffn-5", StructuredPrune(ratio=0.05))
