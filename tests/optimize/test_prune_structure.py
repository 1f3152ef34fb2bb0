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
    fields = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=GROUPS, vocab_size=64, max_position_embeddings=64, attention_bias=True,
                  mlp_bias=True, tie_word_embeddings=False)
    config = LlamaConfig(**{**fields, **extra})
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
        for module in (*layer.mlp.children(), *layer.self_attn.children()):  # each new Linear says its shape
            if isinstance(module, torch.nn.Linear):
                assert (module.out_features, module.in_features) == tuple(module.weight.shape), module
    assert not any(p.requires_grad for p in model.parameters())  # frozen weights stay frozen
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.head_dim) == (48, 2, 1, HEAD_DIM)
    assert all(isinstance(getattr(model.config, k), int) for k in ("num_attention_heads", "num_key_value_heads"))
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
    del reference.config.head_dim  # as older configs: head_dim implied by hidden / heads, and left implied
    model = copy.deepcopy(reference)
    report = StructuredPrune(ratio=0.25, multiple_of=16).apply(SimpleNamespace(model=model, labels=[]))
    for ref, layer in zip(reference.model.layers, model.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(layer.self_attn, name) is not None
            assert torch.equal(getattr(layer.self_attn, name).weight, getattr(ref.self_attn, name).weight)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, GROUPS)
    assert report["num_attention_heads_after"] == HEADS and report["heads_ratio_achieved"] == 0.0
    assert all(p.requires_grad for p in model.parameters())
    changed = {k for k, v in model.config.to_dict().items() if reference.config.to_dict().get(k) != v}
    assert changed == {"intermediate_size"}  # FFN-only pruning changes the FFN width and nothing else


def _shapes(layer) -> dict:
    return {name: tuple(getattr(layer.self_attn, name).weight.shape) for name in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")}


def test_an_explicit_head_dim_wider_than_hidden_over_heads_is_what_heads_are_cut_by():
    # Qwen3 / Gemma style: head_dim 16 while hidden 32 / 4 heads = 8
    model = _llama(head_dim=16)
    report = StructuredPrune(ratio=0.25, heads_ratio=0.5, multiple_of=16).apply(SimpleNamespace(model=model,
                                                                                                labels=[]))
    assert report["head_dim"] == 16 and model.config.head_dim == 16
    for layer in model.model.layers:  # one KV group of 16 and its 2 query heads
        assert _shapes(layer) == {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_a_config_without_kv_heads_or_head_dim_means_one_kv_head_per_query_head_of_hidden_over_heads():
    model = _llama(num_key_value_heads=HEADS)  # multi-head attention
    del model.config.num_key_value_heads, model.config.head_dim
    report = StructuredPrune(ratio=0.25, heads_ratio=0.5, multiple_of=16).apply(SimpleNamespace(model=model,
                                                                                                labels=[]))
    assert (report["num_key_value_heads_before"], report["num_key_value_heads_after"], report["head_dim"]) == (4, 2, 8)
    for layer in model.model.layers:  # 2 of 4 heads of 8 kept, each its own KV head
        assert _shapes(layer) == {"q_proj": (16, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 16)}


def test_head_scores_weigh_values_by_output_columns_by_hand():
    from optimize.prune.structured import _head_weight_scores

    # 2 KV groups of head_dim 1, one query head each (rep 1); hidden 3 (not heads x head_dim).
    attn = SimpleNamespace(v_proj=SimpleNamespace(weight=torch.tensor([[3.0, 0, 0], [0, 1.0, 0]])),
                           o_proj=SimpleNamespace(weight=torch.tensor([[1.0, 0], [0, 2.0], [0, 0]])))
    # group 0: |v| 3 x |o column| 1 = 3; group 1: 1 x 2 = 2
    assert _head_weight_scores(attn, head_dim=1, rep=1).tolist() == [3.0, 2.0]


def test_activation_importance_ranks_by_the_calibrated_scores_and_says_so(monkeypatch):
    import optimize.prune.structured as structured

    model = _llama()
    calls = []
    # Scores that make neurons 16..63 and KV group 1 the important ones, in every layer.
    ffn = torch.cat([torch.zeros(16), torch.ones(48)])
    groups = torch.tensor([0.0, 1.0])

    def scores(state, layers, head_dim, rep, with_heads):
        calls.append((state, layers, head_dim, rep, with_heads))
        return [ffn] * len(layers), [groups if with_heads else None] * len(layers)

    monkeypatch.setattr(structured, "_activation_scores", scores)
    reference = copy.deepcopy(model)
    state = SimpleNamespace(model=model, labels=[])
    StructuredPrune(ratio=0.25, heads_ratio=0.5, importance="activation", multiple_of=16).apply(state)
    (got_state, layers, head_dim, rep, with_heads), = calls
    assert got_state is state and layers == list(model.model.layers) and (head_dim, rep, with_heads) == (8, 2, True)
    assert isinstance(rep, int)  # query heads per KV group: a whole number
    assert state.labels == ["prune-ffn importance calibrated on the evaluation text: drift measured on that text "
                            "is optimistic"]
    for ref, layer in zip(reference.model.layers, model.model.layers, strict=True):
        assert torch.equal(layer.mlp.gate_proj.weight, ref.mlp.gate_proj.weight[16:])
        assert torch.equal(layer.self_attn.k_proj.weight, ref.self_attn.k_proj.weight[8:])
    calls.clear()
    StructuredPrune(ratio=0.25, importance="activation", multiple_of=16).apply(SimpleNamespace(model=_llama(),
                                                                                              labels=[]))
    assert calls[0][4] is False  # no heads removed: none scored


@pytest.mark.parametrize("multiple_of", [1, 64])
def test_any_whole_multiple_of_at_least_one_is_valid(multiple_of):
    StructuredPrune(multiple_of=multiple_of).validate()


@pytest.mark.parametrize("multiple_of", [0, True, 1.5])
def test_multiple_of_must_be_a_whole_number_of_at_least_one(multiple_of):
    from optimize.errors import RecipeError

    with pytest.raises(RecipeError) as exc:
        StructuredPrune(multiple_of=multiple_of).validate()
    assert str(exc.value) == f"prune-ffn.multiple_of must be an integer >= 1, got {multiple_of!r}"


@pytest.mark.parametrize("make, message", [
    (lambda: _with_config(torch.nn.Linear(4, 4)),
     "prune-ffn supports Llama-style decoders (model.layers); Linear has none"),
    (lambda: _without(_llama(), "mlp", "up_proj"),
     "prune-ffn supports Llama-style decoders; LlamaForCausalLM layers have no mlp.up_proj"),
    (lambda: _without(_llama(), "self_attn", "o_proj"),
     "prune-ffn supports Llama-style decoders; LlamaForCausalLM layers have no self_attn.o_proj"),
    (lambda: _uneven(_llama()),
     "prune-ffn: the decoder layers differ in FFN width ([48, 64]); one config width cannot describe them"),
    (lambda: _without(_llama(), None, "mlp"),
     "prune-ffn supports Llama-style decoders; LlamaForCausalLM layers have no mlp.gate_proj"),
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


def _uneven(model):
    model.model.layers[1].mlp.gate_proj = torch.nn.Linear(HIDDEN, 48)
    return model


def _with_config(module):
    module.config = SimpleNamespace(num_attention_heads=4, hidden_size=16, intermediate_size=32)
    return module


def _without(model, owner: str | None, name: str):
    layer = model.model.layers[0]
    delattr(getattr(layer, owner) if owner else layer, name)
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
    model.model.layers[0].self_attn.q_proj.to(torch.float32)  # layers left in fp32 and fp64: named, none converted
    model.model.layers[1].self_attn.q_proj.to(torch.float64)
    with pytest.raises(NotApplicable) as exc:
        SparseKernels24().apply(state)
    assert str(exc.value) == ("sparse-2of4-kernels needs fp16/bf16 weights, got float32, float64: put a cast step "
                              "before it in the recipe") and len(seen) == 1
    (got_state, layers), = seen
    assert got_state is state
    names = [name for name, _ in layers]
    assert len(names) == 13 and "model.layers.1.mlp.down_proj" not in names and "lm_head" not in names
    assert all(module is model.get_submodule(name) for name, module in layers)
