"""Which weights the pruners remove, against expectations computed here from the reference weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
# Imported when the module is collected (2-3 s), not per test: `make mutation`'s workers fork after it.
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from optimize.errors import NotApplicable, RecipeError  # noqa: E402
from optimize.prune.magnitude import MagnitudePrune, prunable_linears, sparsity_report  # noqa: E402
from optimize.prune.semi_structured import SemiStructured24, SparseKernels24, holds_2of4  # noqa: E402
from optimize.prune.structured import StructuredPrune, kept_groups, kept_width  # noqa: E402
from optimize.recipe import Recipe  # noqa: E402
from optimize.store import VariantStore, load_variant  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def reference():
    """A Llama of the tiny model's shape (hidden 128, 2 layers, GQA 4/2, FFN 256), built in memory."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def stored_reference(tiny_ref):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_ref.path).eval()


def _pruned(reference, step):
    state = SimpleNamespace(model=copy.deepcopy(reference), labels=[])
    report = step.apply(state)
    return state.model, report


def _weights(model, include_lm_head=False) -> dict:
    return {name: m.weight.detach().clone() for name, m in prunable_linears(model, include_lm_head)}


def _smallest_k(values, k: int):
    """Boolean mask of the k smallest |values|, by a full sort (torch's pruner uses topk)."""
    order = values.abs().flatten().sort(stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def _assert_zeroes_exactly(before, after, mask):
    assert torch.equal(after[mask], torch.zeros(int(mask.sum())))
    assert torch.equal(after[~mask], before[~mask])  # everything else untouched
    assert int((before[~mask] == 0).sum()) == 0  # the kept weights were not zero already


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_layer_scope_zeroes_exactly_the_smallest_weights_of_each_linear(reference, sparsity):
    before = _weights(reference)
    model, report = _pruned(reference, MagnitudePrune(sparsity=sparsity, scope="layer"))
    after = _weights(model)
    assert set(after) == {f"model.layers.{i}.{part}.{name}" for i in (0, 1) for part, names in
                          (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for name in names}
    zeros = 0
    for name, w in before.items():
        k = round(sparsity * w.numel())
        _assert_zeroes_exactly(w, after[name], _smallest_k(w, k))
        zeros += k
    total = sum(w.numel() for w in before.values())
    assert report == {"sparsity_target": sparsity, "scope": "layer", "sparsity_achieved": zeros / total,
                      "pruned_weights": zeros, "prunable_weights": total, "modules_touched": 14}
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_global_scope_zeroes_exactly_the_smallest_weights_over_all_linears(reference, sparsity):
    before = _weights(reference)
    model, report = _pruned(reference, MagnitudePrune(sparsity=sparsity, scope="global"))
    after = _weights(model)
    flat = torch.cat([w.flatten() for w in before.values()])
    k = round(sparsity * flat.numel())
    threshold = flat.abs().sort().values[k - 1]  # the k-th smallest magnitude overall
    for name, w in before.items():
        _assert_zeroes_exactly(w, after[name], w.abs() <= threshold)
    assert report["pruned_weights"] == k and report["scope"] == "global"
    # Layers differ in scale, so a global cut is not the same share in every layer.
    shares = {round(float((after[n] == 0).float().mean()), 3) for n in after}
    assert len(shares) > 1


def test_include_lm_head_prunes_the_head_too(reference):
    head = reference.lm_head.weight.detach().clone()
    model, report = _pruned(reference, MagnitudePrune(sparsity=0.3, include_lm_head=True))
    _assert_zeroes_exactly(head, model.lm_head.weight.detach(), _smallest_k(head, round(0.3 * head.numel())))
    assert report["prunable_weights"] == sum(w.numel() for w in _weights(reference, True).values())


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_magnitude_pruning_through_the_store_keeps_the_largest_weights(tiny_ref, cache_dir, stored_reference,
                                                                      sparsity):
    state, artifact = load_variant(tiny_ref, Recipe(name=f"mag-{sparsity}", steps=(MagnitudePrune(sparsity=sparsity),)),
                                   "cpu", VariantStore(cache_dir))
    before, after = _weights(stored_reference), _weights(state.model)  # reloaded from the saved safetensors
    for name, w in before.items():
        _assert_zeroes_exactly(w, after[name], _smallest_k(w, round(sparsity * w.numel())))
    assert artifact.manifest["reports"][0]["sparsity_target"] == sparsity


def test_sparsity_report_counts_zeros_by_hand():
    class Toy(torch.nn.Module):
        def get_output_embeddings(self):
            return self.lm_head

    model = Toy()
    model.a = torch.nn.Linear(4, 2, bias=False)
    model.lm_head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]]))
        model.lm_head.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert sparsity_report(model) == {"sparsity_achieved": 3 / 8, "pruned_weights": 3, "prunable_weights": 8}
    assert sparsity_report(model, include_lm_head=True) == {"sparsity_achieved": 6 / 14, "pruned_weights": 6,
                                                            "prunable_weights": 14}
    assert sparsity_report(torch.nn.Sequential()) == {"sparsity_achieved": 0.0, "pruned_weights": 0,
                                                      "prunable_weights": 0}


@pytest.mark.parametrize("fields, match", [
    ({"sparsity": 0.0}, r"prune-magnitude\.sparsity must be in \(0, 1\), got 0\.0"),
    ({"sparsity": 1.0}, r"prune-magnitude\.sparsity must be in \(0, 1\), got 1\.0"),
    ({"scope": "row"}, r"prune-magnitude\.scope must be one of \('layer', 'global'\), got 'row'"),
])
def test_magnitude_validate_names_field_value_and_allowed(fields, match):
    with pytest.raises(RecipeError, match=match):
        MagnitudePrune(**fields).validate()
    MagnitudePrune(sparsity=0.01).validate()
    MagnitudePrune(sparsity=0.99, scope="global").validate()


# --- 2:4 -----------------------------------------------------------------------------------------

def test_2of4_zeroes_the_two_smallest_of_every_four_and_keeps_the_rest(reference):
    before = _weights(reference)
    model, report = _pruned(reference, SemiStructured24())
    after = _weights(model)
    for name, w in before.items():
        groups = w.reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
        rank = groups.abs().argsort(dim=-1).argsort(dim=-1)  # 0 = smallest |w| of its group
        expected = torch.where(rank < 2, torch.zeros_like(groups), groups)
        assert torch.equal(after[name].reshape(groups.shape), expected), name
    total = sum(w.numel() for w in before.values())
    assert report == {"pattern": "2:4", "layers": 14, "pattern_holds": True, "sparsity_achieved": 0.5,
                      "pruned_weights": total // 2, "prunable_weights": total, "modules_touched": 14}


def test_2of4_refuses_widths_not_divisible_by_four():
    model = torch.nn.Sequential()
    model.add_module("odd", torch.nn.Linear(6, 4))
    with pytest.raises(NotApplicable, match="prune-2of4 needs input widths divisible by 4; odd has 6"):
        SemiStructured24().apply(SimpleNamespace(model=model, labels=[]))


def test_holds_2of4_counts_nonzeros_per_group():
    assert holds_2of4(torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not holds_2of4(torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))
    assert not holds_2of4(torch.zeros(2, 6))  # width not a multiple of 4


def test_sparse_kernels_step_on_cpu_keeps_masked_dense_weights_and_says_so(reference):
    model, _ = _pruned(reference, SemiStructured24())
    state = SimpleNamespace(model=model, labels=[], device="cpu")
    report = SparseKernels24().apply(state)
    assert report == {"sparse_kernels": False, "reason": "no semi-structured sparse kernels on cpu", "layers_2of4": 14,
                      "layers": 14}
    assert state.labels == ["2:4 sparsity as masked dense weights: no semi-structured sparse kernels on cpu"]
    with pytest.raises(RecipeError, match="sparse-2of4-kernels: no decoder linear holds the 2:4 pattern; "
                                          "put prune-2of4 before it in the recipe"):
        SparseKernels24().apply(SimpleNamespace(model=copy.deepcopy(reference), labels=[], device="cpu"))


def test_sparse_kernels_need_compute_capability_8(reference, monkeypatch):
    """A pre-Ampere GPU emulated at torch's boundary: the step keeps dense weights and names the GPU."""
    from optimize.prune.semi_structured import _no_kernels_reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert _no_kernels_reason(SimpleNamespace(device="cuda")) == "Tesla T4 (compute capability 7.5 < 8.0)"
    assert _no_kernels_reason(SimpleNamespace(device="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert _no_kernels_reason(SimpleNamespace(device="cuda")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _no_kernels_reason(SimpleNamespace(device="cuda")) == "cuda"


def test_sparse_kernels_need_half_precision_weights(reference, monkeypatch):
    import optimize.prune.semi_structured as semi

    model, _ = _pruned(reference, SemiStructured24())
    monkeypatch.setattr(semi, "_no_kernels_reason", lambda state: None)  # as on an Ampere GPU
    with pytest.raises(NotApplicable, match="sparse-2of4-kernels needs fp16/bf16 weights, got float32: "
                                            "put a cast step before it in the recipe"):
        SparseKernels24().apply(SimpleNamespace(model=model, labels=[], device="cuda"))


# --- structured ------------------------------------------------------------------------------------

@torch.no_grad()
def _ffn_scores_by_hand(mlp) -> list[float]:
    """|gate row j| * |up row j| * |down column j|, one neuron at a time."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    return [float(gate[j].norm() * up[j].norm() * down[:, j].norm()) for j in range(gate.shape[0])]


@torch.no_grad()
def _head_scores_by_hand(attn, head_dim: int, rep: int) -> list[float]:
    """|value rows of group g| * |output columns of g's query heads|."""
    v, o = attn.v_proj.weight, attn.o_proj.weight
    groups = v.shape[0] // head_dim
    return [float(v[g * head_dim:(g + 1) * head_dim].norm() * o[:, g * rep * head_dim:(g + 1) * rep * head_dim].norm())
            for g in range(groups)]


def _top_by_hand(scores: list[float], k: int):
    return torch.tensor(sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[:k]))


def test_structured_ffn_keeps_the_neurons_with_the_highest_hand_computed_scores(reference):
    model, report = _pruned(reference, StructuredPrune(ratio=0.25))
    for ref_layer, layer in zip(reference.model.layers, model.model.layers, strict=True):
        keep = _top_by_hand(_ffn_scores_by_hand(ref_layer.mlp), 192)
        assert torch.equal(layer.mlp.gate_proj.weight, ref_layer.mlp.gate_proj.weight[keep])
        assert torch.equal(layer.mlp.up_proj.weight, ref_layer.mlp.up_proj.weight[keep])
        assert torch.equal(layer.mlp.down_proj.weight, ref_layer.mlp.down_proj.weight[:, keep])
        assert torch.equal(layer.self_attn.q_proj.weight, ref_layer.self_attn.q_proj.weight)  # heads untouched
    assert report["ratio_achieved"] == 0.25 and report["heads_ratio_achieved"] == 0.0
    assert report["parameters_removed_fraction"] == pytest.approx(
        2 * 3 * 128 * 64 / sum(p.numel() for p in reference.parameters()))


def test_structured_heads_keep_the_kv_group_with_the_highest_hand_computed_score(reference):
    model, report = _pruned(reference, StructuredPrune(ratio=0.25, heads_ratio=0.5))
    for ref_layer, layer in zip(reference.model.layers, model.model.layers, strict=True):
        ref_attn, attn = ref_layer.self_attn, layer.self_attn
        scores = _head_scores_by_hand(ref_attn, head_dim=32, rep=2)
        g = max(range(2), key=lambda i: scores[i])
        kv, q = slice(g * 32, (g + 1) * 32), slice(g * 64, (g + 1) * 64)  # group g: KV rows, its 2 query heads
        assert torch.equal(attn.k_proj.weight, ref_attn.k_proj.weight[kv])
        assert torch.equal(attn.v_proj.weight, ref_attn.v_proj.weight[kv])
        assert torch.equal(attn.q_proj.weight, ref_attn.q_proj.weight[q])
        assert torch.equal(attn.o_proj.weight, ref_attn.o_proj.weight[:, q])
    assert report["heads_ratio_achieved"] == 0.5 and model.config.head_dim == 32


def test_kept_width_and_groups_by_hand():
    assert kept_width(256, 0.25, 64) == 192 and kept_width(256, 0.6, 64) == 128  # 102.4 -> 128 (nearest)
    assert kept_width(256, 0.7, 64) == 64 and kept_width(256, 0.9, 64) == 64  # never below one multiple
    assert kept_width(100, 0.3, 1) == 70 and kept_width(10, 0.25, 1) == 8  # 7.5 rounds half up
    with pytest.raises(NotApplicable, match="removing 5% of 256 neurons and rounding to a multiple of 64 keeps all"):
        kept_width(256, 0.05, 64)
    assert kept_groups(8, 0.5) == 4 and kept_groups(8, 0.3) == 6 and kept_groups(4, 0.125) == 3  # 2.4 -> 2; 0.5 -> 1
    with pytest.raises(NotApplicable, match="heads_ratio 0.1 of 4 KV-head groups removes 0; need between 1 and 3"):
        kept_groups(4, 0.1)
    with pytest.raises(NotApplicable, match="heads_ratio 0.9 of 2 KV-head groups removes 2; need between 1 and 1"):
        kept_groups(2, 0.9)
