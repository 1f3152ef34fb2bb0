"""Structured pruning rewrites the model consistently: a unit whose weights are zero is removed
without changing a single logit, and every config field, module attribute and report figure
follows. Plus the pruners' refusals, word for word.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
# Imported when the module is collected (2-3 s), not per test: `make mutation`'s workers fork after it.
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from optimize.errors import NotApplicable  # noqa: E402
from optimize.prune.magnitude import MagnitudePrune, prunable_linears  # noqa: E402
from optimize.prune.semi_structured import SemiStructured24, SparseKernels24, mask_2of4  # noqa: E402
from optimize.prune.structured import StructuredPrune  # noqa: E402

HIDDEN, FFN, HEADS, GROUPS, HEAD_DIM = 32, 64, 4, 2, 8
REP = HEADS // GROUPS
# Per layer: the FFN neurons and the KV group made worthless (all their weights and biases zero).
DEAD_NEURONS = {0: list(range(0, 64, 4)), 1: list(range(40, 56))}  # 16 of 64 each
DEAD_GROUP = {0: 0, 1: 1}


def _llama(**extra):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=GROUPS, vocab_size=64, max_position_embeddings=64,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **extra)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _kill_units(model) -> None:
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        dead = torch.tensor(DEAD_NEURONS[i])
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[dead] = 0
            proj.bias[dead] = 0
        mlp.down_proj.weight[:, dead] = 0
        g = DEAD_GROUP[i]
        q, kv = slice(g * REP * HEAD_DIM, (g + 1) * REP * HEAD_DIM), slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
        attn.q_proj.weight[q], attn.q_proj.bias[q] = 0, 0
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[kv], proj.bias[kv] = 0, 0
        attn.o_proj.weight[:, q] = 0


def _alive(i: int):
    neurons = torch.tensor([j for j in range(FFN) if j not in DEAD_NEURONS[i]])
    g = 1 - DEAD_GROUP[i]
    q = torch.arange(g * REP * HEAD_DIM, (g + 1) * REP * HEAD_DIM)
    kv = torch.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM)
    return neurons, q, kv


def test_removing_worthless_neurons_and_heads_changes_no_logit_and_keeps_the_rest_exactly():
    reference = _llama()
    _kill_units(reference)
    reference.requires_grad_(False)
    for layer in reference.model.layers:  # attributes older transformers and other decoders keep on the module
        layer.self_attn.num_heads, layer.self_attn.num_key_value_heads = HEADS, GROUPS
    model = copy.deepcopy(reference)
    report = StructuredPrune(ratio=0.25, heads_ratio=0.5, multiple_of=16).apply(SimpleNamespace(model=model,
                                                                                                labels=[]))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    for i, (ref, layer) in enumerate(zip(reference.model.layers, model.model.layers, strict=True)):
        neurons, q, kv = _alive(i)
        for name in ("gate_proj", "up_proj"):
            old, new = getattr(ref.mlp, name), getattr(layer.mlp, name)
            assert torch.equal(new.weight, old.weight[neurons]) and torch.equal(new.bias, old.bias[neurons])
        assert torch.equal(layer.mlp.down_proj.weight, ref.mlp.down_proj.weight[:, neurons])
        assert torch.equal(layer.mlp.down_proj.bias, ref.mlp.down_proj.bias)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            old, new = getattr(ref.self_attn, name), getattr(layer.self_attn, name)
            assert torch.equal(new.weight, old.weight[rows]) and torch.equal(new.bias, old.bias[rows])
        assert torch.equal(layer.self_attn.o_proj.weight, ref.self_attn.o_proj.weight[:, q])
        assert torch.equal(layer.self_attn.o_proj.bias, ref.self_attn.o_proj.bias)
        assert (layer.mlp.intermediate_size, layer.self_attn.num_heads, layer.self_attn.num_key_value_heads) == (
            48, 2, 1)
    assert not any(p.requires_grad for p in model.parameters())  # frozen weights stay frozen
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.head_dim) == (48, 2, 1, HEAD_DIM)
    before = sum(p.numel() for p in reference.parameters())
    after = sum(p.numel() for p in model.parameters())
    # Per layer: 16 neurons x (gate row + bias, up row + bias, down column) and one KV group: q rows of its
    # 2 heads (+ bias), k and v rows (+ bias), o columns.
    removed = 2 * (16 * (2 * (HIDDEN + 1) + HIDDEN) + 16 * (HIDDEN + 1) + 2 * 8 * (HIDDEN + 1) + 16 * HIDDEN)
    assert before - after == removed
    assert report == {
        "importance": "weight", "ratio_target": 0.25, "ratio_achieved": 0.25, "heads_ratio_target": 0.5,
        "heads_ratio_achieved": 0.5, "intermediate_size_before": 64, "num_attention_heads_before": 4,
        "num_key_value_heads_before": 2, "intermediate_size_after": 48, "num_attention_heads_after": 2,
        "num_key_value_heads_after": 1, "head_dim": HEAD_DIM, "parameters_before": before,
        "parameters_after": after, "parameters_removed_fraction": 1 - after / before}


def test_ffn_only_pruning_leaves_attention_and_its_config_alone():
    reference = _llama()
    _kill_units(reference)
    model = copy.deepcopy(reference)
    report = StructuredPrune(ratio=0.25, multiple_of=16).apply(SimpleNamespace(model=model, labels=[]))
    for ref, layer in zip(reference.model.layers, model.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(layer.self_attn, name) is not None
            assert torch.equal(getattr(layer.self_attn, name).weight, getattr(ref.self_attn, name).weight)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, GROUPS)
    assert report["num_attention_heads_after"] == HEADS and report["heads_ratio_achieved"] == 0.0
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda: _with_config(torch.nn.Linear(4, 4)),
     "prune-ffn supports Llama-style decoders (model.layers); Linear has none"),
    (lambda: _without(_llama(), "mlp", "up_proj"),
     "prune-ffn supports Llama-style decoders; LlamaForCausalLM layers have no mlp.up_proj"),
    (lambda: _without(_llama(), "self_attn", "o_proj"),
     "prune-ffn supports Llama-style decoders; LlamaForCausalLM layers have no self_attn.o_proj"),
])
def test_structured_pruning_refuses_models_it_cannot_rewrite(make, message):
    with pytest.raises(NotApplicable) as exc:
        StructuredPrune().apply(SimpleNamespace(model=make(), labels=[]))
    assert str(exc.value) == message


def test_structured_pruning_needs_a_config_with_an_ffn_width():
    model = _llama()
    del model.config.intermediate_size
    with pytest.raises(NotApplicable) as exc:
        StructuredPrune().apply(SimpleNamespace(model=model, labels=[]))
    assert str(exc.value) == "prune-ffn: LlamaForCausalLM config has no intermediate_size to update"


def _with_config(module):
    module.config = SimpleNamespace(num_attention_heads=4, hidden_size=16, intermediate_size=32)
    return module


def _without(model, owner: str, name: str):
    delattr(getattr(model.model.layers[0], owner), name)
    return model


def test_magnitude_pruning_leaves_the_lm_head_out_unless_asked_and_refuses_models_without_linears():
    model = _llama()
    assert "lm_head" not in {name for name, _ in prunable_linears(model)}
    assert "lm_head" in {name for name, _ in prunable_linears(model, include_lm_head=True)}
    with pytest.raises(NotApplicable) as exc:
        MagnitudePrune().apply(SimpleNamespace(model=torch.nn.Embedding(4, 4), labels=[]))
    assert str(exc.value) == "prune-magnitude found no linear-like layer to prune in Embedding"
    with pytest.raises(NotApplicable) as exc:
        SemiStructured24().apply(SimpleNamespace(model=torch.nn.Embedding(4, 4), labels=[]))
    assert str(exc.value) == "prune-2of4 found no linear-like layer in Embedding"


def test_the_2of4_mask_is_boolean():
    mask = mask_2of4(torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, 2.5, -0.1, 9.0]]))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, True, False, False, True, False, True]]


def test_sparse_kernels_hand_every_2of4_linear_to_the_converter_on_a_gpu_with_kernels(monkeypatch):
    """An Ampere GPU emulated: half-precision 2:4 weights go to the converter, with their names."""
    import optimize.prune.semi_structured as semi

    model = copy.deepcopy(_llama())
    SemiStructured24().apply(SimpleNamespace(model=model, labels=[]))
    model = model.to(torch.float16)
    model.model.layers[1].mlp.down_proj.weight.data.fill_(1.0)  # no longer 2:4: left out
    monkeypatch.setattr(semi, "_no_kernels_reason", lambda state: None)
    seen = []
    monkeypatch.setattr(semi, "_convert", lambda state, layers: seen.append((state, layers)) or {"converted": 1})
    state = SimpleNamespace(model=model, labels=[], device="cuda")
    assert SparseKernels24().apply(state) == {"converted": 1}
    (got_state, layers), = seen
    assert got_state is state
    names = [name for name, _ in layers]
    assert len(names) == 13 and "model.layers.1.mlp.down_proj" not in names and "lm_head" not in names
    assert all(module is model.get_submodule(name) for name, module in layers)
