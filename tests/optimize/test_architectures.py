"""The architecture matrix: every built-in variant on one tiny random model per HF family.

Models are built from configs (no downloads): Llama (GQA 4/2), Llama with tied embeddings,
GPT-2 (Conv1D layers, tied), OPT (tied, no MLP module), GPT-NeoX (fused QKV), Qwen2 (GQA),
Mistral (GQA) and Phi (partial rotary). Each variant must build and generate (``ok``) or be
``skipped`` with the reason this test expects; lossless variants must reproduce the
reference's greedy tokens; techniques must say what they touched.

``static-kv`` runs with its static cache but without ``torch.compile`` here (through
``generate()``); test_static_decoder compiles it, in its own decode loop, on every architecture.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from bench.prompts import prompt_ids  # noqa: E402
from bench.scenarios.generate import greedy_generate  # noqa: E402
from optimize import introspect  # noqa: E402
from optimize.errors import NotApplicable  # noqa: E402
from optimize.kvcache import KVCache  # noqa: E402
from optimize.recipe import Recipe  # noqa: E402
from optimize.registry import variants  # noqa: E402
from optimize.store import load_variant  # noqa: E402
from tests.optimize.helpers import synthetic_fp32  # noqa: E402

ARCHITECTURES = ("llama-tiny", "llama-tied-tiny", "gpt2-tiny", "opt-tiny", "gpt-neox-tiny", "qwen2-tiny",
                 "mistral-tiny", "phi-tiny")
NOT_LLAMA_STYLE = ("gpt2-tiny", "opt-tiny", "gpt-neox-tiny", "phi-tiny")
NEW_TOKENS = 6

# Skips every architecture gets on a CPU, with the words their reason must contain.
CPU_SKIPS = {
    "fp16": "fp16 needs CUDA",
    "torchao-int4-wo": "needs CUDA",
    "onnx-fp16": "needs CUDA",
    "prune-2of4-fp16": "fp16 needs CUDA",
}
QUANTIZERS = ("torch-int8-dynamic", "torchao-int8-wo", "bnb-int8", "bnb-nf4")


def expected_skip(arch: str, variant: str) -> str | None:
    if variant in CPU_SKIPS:
        return CPU_SKIPS[variant]
    if variant == "prune-ffn-25" and arch in NOT_LLAMA_STYLE:
        return "prune-ffn supports Llama-style decoders"
    return None


def _recipe(name: str) -> Recipe:
    recipe = variants()[name].recipe
    if name == "static-kv":
        steps = tuple(dataclasses.replace(s, compile=False) if isinstance(s, KVCache) else s for s in recipe.steps)
        recipe = dataclasses.replace(recipe, steps=steps)
    return recipe


def _run(ref, name, store, prompts):
    """(status, reason or None, state or None, generated tokens or None)."""
    try:
        state, artifact = load_variant(ref, _recipe(name), "cpu", store)
        tokens = greedy_generate(state, prompts, NEW_TOKENS).cpu()
    except NotApplicable as exc:
        return "skipped", str(exc), None, None, None
    return "ok", None, state, artifact, tokens


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_cpu_variant_is_ok_or_skipped_with_its_reason(arch, cache_dir):
    ref, store, reference, prompts = synthetic_fp32(arch, cache_dir)
    assert prompt_ids(ref, reference.model.config.vocab_size, 2, 12)[1] == "eval-text"
    expected_tokens = greedy_generate(reference, prompts, NEW_TOKENS).cpu()
    linear_like = len(introspect.linear_layers(reference.model))
    outcomes = {}
    for name in variants():
        status, reason, state, artifact, tokens = _run(ref, name, store, prompts)
        outcomes[name] = reason or status
        want = expected_skip(arch, name)
        if want:
            assert status == "skipped" and want in reason, (arch, name, status, reason)
            continue
        assert status == "ok", (arch, name, reason)
        assert tokens.shape == (2, 12 + NEW_TOKENS), (arch, name)
        if _recipe(name).lossless:
            assert torch.equal(tokens, expected_tokens), f"{arch} {name}: lossless variant changed greedy tokens"
        # every step's report, saved (from the manifest) and runtime, in recipe order: what a cell records
        assert [r["technique"] for r in state.reports] == [s.technique for s in _recipe(name).steps], (arch, name)
        assert state.reports[:len(artifact.manifest.get("reports", []))] == artifact.manifest.get("reports", [])
        reports = {r["technique"]: r for r in state.reports}
        if name in QUANTIZERS:
            report = reports[_recipe(name).steps[0].technique]
            # every linear-like layer; torch-int8-dynamic adds an untied LM head (a tied one would grow the bytes)
            head = name == "torch-int8-dynamic" and not introspect.tied_embeddings(reference.model)
            assert report["modules_touched"] == linear_like + head, (arch, name, report)
            assert report["bytes_after"] < report["bytes_before"], (arch, name, report)
        if name == "prune-50":
            assert reports["prune-magnitude"]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01), arch
            assert reports["prune-magnitude"]["modules_touched"] == linear_like
        if name == "prune-2of4":
            assert reports["prune-2of4"]["pattern_holds"] is True and reports["prune-2of4"]["layers"] == linear_like
        if name == "onnx-fp32":
            layers = len(introspect.decoder_layers(reference.model))
            assert reports["onnx-export"]["past_key_value_inputs"] == 2 * layers, arch
    assert set(outcomes) == set(variants())


def test_introspection_finds_conv1d_layers_and_the_tied_head_of_gpt2(cache_dir):
    from transformers import AutoModelForCausalLM

    from optimize.models import SYNTHETIC, synthetic_config

    model = AutoModelForCausalLM.from_config(synthetic_config(SYNTHETIC["gpt2-tiny"]))
    layers = introspect.linear_layers(model)
    assert {layer.kind for layer in layers} == {"conv1d"}
    assert len(layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    c_attn = next(layer for layer in layers if layer.name.endswith("attn.c_attn"))
    assert (c_attn.in_features, c_attn.out_features) == (64, 3 * 64)
    assert c_attn.weight_out_in().shape == (3 * 64, 64)
    assert introspect.tied_embeddings(model)
    assert introspect.kv_geometry(model) == introspect.KVGeometry(2, 4, 16, "cache")


def test_linearized_conv1d_computes_the_same_outputs():
    from transformers import AutoModelForCausalLM

    from optimize.models import SYNTHETIC, synthetic_config

    model = AutoModelForCausalLM.from_config(synthetic_config(SYNTHETIC["gpt2-tiny"])).eval()
    ids = torch.randint(0, 8192, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert introspect.linearize_conv1d(model) == 8
        after = model(ids).logits
    assert {layer.kind for layer in introspect.linear_layers(model)} == {"linear"}
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_kv_geometry_reads_grouped_query_heads_from_the_cache():
    from transformers import AutoModelForCausalLM

    from optimize.models import SYNTHETIC, synthetic_config

    model = AutoModelForCausalLM.from_config(synthetic_config(SYNTHETIC["mistral-tiny"]))
    geometry = introspect.kv_geometry(model)
    assert (geometry.layers, geometry.kv_heads, geometry.head_dim) == (2, 2, 16)
    assert geometry.bytes_per_token(4) == 2 * 2 * 2 * 16 * 4
    assert introspect.kv_geometry_from_config(model.config) == dataclasses.replace(geometry, source="config")


def test_a_step_that_changes_nothing_or_grows_the_weights_is_not_applicable():
    nothing = introspect.change_report(0, 5, 100, 100)
    with pytest.raises(NotApplicable, match="changed nothing"):
        introspect.require_effect("x", nothing, shrinks=False)
    grew = introspect.change_report(1, 5, 100, 120)
    with pytest.raises(NotApplicable, match="did not shrink"):
        introspect.require_effect("x", grew, shrinks=True)
    introspect.require_effect("x", grew, shrinks=False)  # pruning keeps dense bytes: growth is not its test
    introspect.require_effect("x", introspect.change_report(1, 5, 100, 60), shrinks=True)


def test_onnx_export_of_an_architecture_optimum_cannot_export_is_skipped_with_the_reason(tmp_path):
    import json

    from optimize.export.onnx import require_exportable

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(NotApplicable, match="no ONNX export with past key/values .* 'mamba'"):
        require_exportable(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert require_exportable(tmp_path) == "gpt_neox"
