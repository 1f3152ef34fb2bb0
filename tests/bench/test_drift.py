"""Accuracy drift against the fp32 reference, on the tiny model with small windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.metrics.drift import (
    METHOD_VERSION,
    PROTOCOL,
    REFERENCE_JSON,
    REFERENCE_TENSORS,
    DriftBudget,
    DriftConfig,
    ensure_reference,
    measure_drift,
    reference_path,
)
from bench.metrics.drift_figures import generation_agreement, kl_divergence, summarize_drift, token_drift
from optimize.errors import InputError

# 16 windows of 64 tokens: each test takes seconds on two CPU cores.
SMALL = DriftConfig(context=64, max_tokens=1024, batch_windows=4, gen_prompts=2, gen_prompt_tokens=16,
                    gen_new_tokens=8)


@pytest.fixture
def drift_cache(tmp_path):
    """A drift cache of the test's own: every test that reads a reference computes it (a quarter second),
    so a mutation tester sees each of them exercise the reference pass, not only the first."""
    return tmp_path / "drift-cache"


@pytest.fixture
def reference(tiny_ref, drift_cache):
    return ensure_reference(tiny_ref, SMALL, drift_cache)


@pytest.fixture
def drift_of(tiny_ref, cache_dir, reference):
    """Drift metrics of a recipe (steps given as a tuple) against this test's reference."""
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    done: dict = {}

    def measure(*steps):
        if steps not in done:
            state, _ = load_variant(tiny_ref, Recipe(name="under-test", steps=steps), "cpu", VariantStore(cache_dir))
            done[steps] = measure_drift(state, reference, SMALL)
        return done[steps]

    return measure


def _independent_windows():
    """The evaluation windows, tokenized and cut here without the project's helpers."""
    from transformers import AutoTokenizer

    from optimize.reference import BUILTIN_DIR, EVAL_TEXT

    tok = AutoTokenizer.from_pretrained(str(BUILTIN_DIR))
    ids = tok(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    count = SMALL.max_tokens // SMALL.context
    return torch.tensor(ids[: count * SMALL.context]).reshape(count, SMALL.context)


def test_reference_perplexity_matches_plain_transformers_forward(tiny_ref, reference, drift_of):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    windows = _independent_windows()
    model = AutoModelForCausalLM.from_pretrained(tiny_ref.path, dtype=torch.float32).eval()
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])  # HF shifts labels: mean NLL of tokens 2..T
            nll_sum += float(out.loss) * (len(w) - 1)
            count += len(w) - 1
        first_logprobs = torch.log_softmax(model(input_ids=windows[:1]).logits[0, :-1].float(), dim=-1)
    expected = math.exp(nll_sum / count)

    measured = drift_of()["reference_perplexity"]
    stored = json.loads((reference / REFERENCE_JSON).read_text())["reference_perplexity"]
    assert measured == pytest.approx(expected, rel=1e-3)
    assert stored == pytest.approx(expected, rel=1e-3)
    assert drift_of()["scored_tokens"] == count
    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), windows)
        torch.testing.assert_close(f.get_slice("logprobs")[0:1][0], first_logprobs, atol=1e-5, rtol=1e-5)


def test_reference_pass_is_cached_and_not_recomputed(tiny_ref, drift_cache, reference, monkeypatch):
    import optimize.models

    files = [reference / REFERENCE_TENSORS, reference / REFERENCE_JSON]
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_load(*args, **kwargs):
        raise AssertionError("the reference model was loaded again")

    monkeypatch.setattr(optimize.models, "load_torch_model", no_load)
    assert ensure_reference(tiny_ref, SMALL, drift_cache) == reference
    assert [f.stat().st_mtime_ns for f in files] == stamps

    info = json.loads(files[1].read_text())
    windows, scored = SMALL.max_tokens // SMALL.context, SMALL.max_tokens // SMALL.context * (SMALL.context - 1)
    assert info["method"]["windows"] == windows and info["method"]["scored_tokens"] == scored
    assert info["file_bytes"] >= scored * 8192 * 4  # float32 log-probs over the full vocabulary


def test_reference_key_ignores_batching_but_not_window_settings(tiny_ref, drift_cache, reference):
    from dataclasses import replace

    assert reference_path(tiny_ref, replace(SMALL, batch_windows=1), drift_cache) == reference
    assert reference_path(tiny_ref, replace(SMALL, context=32), drift_cache) != reference
    assert reference_path(tiny_ref, replace(SMALL, gen_new_tokens=4), drift_cache) != reference
    assert reference_path(tiny_ref, SMALL, drift_cache, device="cuda") != reference


def test_measure_rejects_a_reference_built_with_other_settings(tiny_ref, cache_dir, reference):
    from dataclasses import replace

    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    with pytest.raises(InputError, match="differ from those of the reference"):
        measure_drift(state, reference, replace(SMALL, context=32))


def test_reference_against_itself_has_no_drift(drift_of):
    m = drift_of()
    assert m["kld_mean"] < 1e-6 and m["kld_max"] < 1e-6
    assert m["top1_agreement"] == 1.0
    assert m["gen_exact_match"] == 1.0 and m["gen_common_prefix_mean"] == SMALL.gen_new_tokens
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_no_kv_cache_variant_scores_like_the_reference(drift_of):
    from optimize.kvcache import KVCache

    m = drift_of(KVCache(mode="none"))
    assert m["kld_mean"] < 1e-4
    assert m["top1_agreement"] >= 0.999


def test_pruning_drifts_more_than_bf16(drift_of):
    from optimize.prune.magnitude import MagnitudePrune
    from optimize.quantize.cast import Cast

    bf16, pruned = drift_of(Cast(dtype="bfloat16")), drift_of(MagnitudePrune(sparsity=0.5))
    assert 0 < bf16["kld_mean"] < pruned["kld_mean"]
    assert pruned["top1_agreement"] < 1.0
    assert pruned["kld_p99"] >= pruned["kld_median"] >= pruned["kld_min"] >= 0
    assert pruned["drift_method"]["context"] == SMALL.context


def test_kl_divergence_matches_scipy_rel_entr():
    from scipy.special import rel_entr

    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    expected = rel_entr(p.numpy(), q.numpy()).sum(-1)
    got = kl_divergence(p.log(), q.log())  # log(0) = -inf for p's empty bin contributes 0
    torch.testing.assert_close(got, torch.from_numpy(expected))

    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 3, 50, generator=gen), -1)
    lq = torch.log_softmax(torch.randn(2, 3, 50, generator=gen), -1)
    reference = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(lp, lq), reference)
    assert torch.equal(kl_divergence(lp, lp), torch.zeros(2, 3))


def test_token_drift_and_summary_follow_the_definitions():
    lp = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]]))  # (1, 2, 3)
    lq = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]]))
    targets = torch.tensor([[0, 2]])
    t = token_drift(lp, lq, targets)
    assert t["top1"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(t["delta_p"], torch.tensor([-0.1, -0.2], dtype=torch.float64))
    m = summarize_drift(t)
    nll_ref = -(math.log(0.7) + math.log(0.3)) / 2
    nll_var = -(math.log(0.6) + math.log(0.1)) / 2
    assert m["reference_perplexity"] == pytest.approx(math.exp(nll_ref))
    assert m["ppl_ratio"] == pytest.approx(math.exp(nll_var - nll_ref))
    assert m["top1_agreement"] == 0.5 and m["top1_agreement_stderr"] == pytest.approx(math.sqrt(0.25 / 2))
    assert m["delta_p_rms"] == pytest.approx(math.sqrt((0.01 + 0.04) / 2))


def test_generation_agreement_counts_exact_matches_and_common_prefixes():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    var = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 8]])
    assert generation_agreement(ref, var) == {"gen_exact_match": 0.5, "gen_common_prefix_mean": 3.0}


def test_drift_budget_flags_violations_and_passes_within_limits():
    metrics = {"kld_mean": 0.02, "kld_p99": 0.3, "ppl_ratio": 1.01, "top1_agreement": 0.93, "gen_exact_match": 1.0}
    strict = DriftBudget.from_dict({"max_kld_mean": 0.01, "min_top1_agreement": 0.95}, "matrix.toml [drift.budget]")
    violations = strict.check(metrics)
    assert len(violations) == 2
    assert any("kld_mean" in v and "max_kld_mean" in v for v in violations)
    assert any("top1_agreement" in v for v in violations)

    loose = DriftBudget(max_kld_mean=0.05, max_kld_p99=0.5, max_ppl_ratio=1.05, min_top1_agreement=0.9,
                        min_gen_exact_match=1.0)
    assert loose.check(metrics) == []
    assert DriftBudget().check({}) == []
    assert DriftBudget(max_kld_p99=0.1).check({}) == ["kld_p99 was not measured (budget max_kld_p99 = 0.1)"]


def test_drift_budget_rejects_unknown_keys_and_bad_limits():
    with pytest.raises(InputError, match=r"budget\]: 'max_kld' is not a drift budget limit \(did you mean"):
        DriftBudget.from_dict({"max_kld": 0.1}, "m.toml [drift.budget]")
    with pytest.raises(InputError, match="min_top1_agreement must be a fraction"):
        DriftBudget.from_dict({"min_top1_agreement": 95}, "m.toml [drift.budget]")
    with pytest.raises(InputError, match="max_ppl_ratio must be a non-negative number"):
        DriftBudget.from_dict({"max_ppl_ratio": "1.1"}, "m.toml [drift.budget]")


def test_drift_config_validation_names_the_field():
    with pytest.raises(InputError, match="context"):
        DriftConfig(context=1).validate()
    with pytest.raises(InputError, match="max_tokens"):
        DriftConfig(context=256, max_tokens=100).validate()
    with pytest.raises(InputError, match="gen_new_tokens"):
        DriftConfig(gen_new_tokens=0).validate()
    with pytest.raises(InputError, match="'windows' is not a drift setting"):
        DriftConfig.from_dict({"windows": 4}, "m.toml [drift]")
    assert DriftConfig.from_dict({"context": 128}, "m.toml [drift]").windows == 8192 // 128
    with pytest.raises(InputError) as exc:
        DriftConfig(scoring="cached").validate()
    assert str(exc.value) == "drift scoring must be one of 'auto', 'full-window', 'through-cache', got 'cached'"


def test_reference_key_follows_the_tokenizer_content_not_its_directory(tiny_ref, cache_dir, tmp_path):
    import shutil
    from dataclasses import replace
    from pathlib import Path

    source = Path(tiny_ref.tokenizer)
    same, other = tmp_path / "same", tmp_path / "other"
    for d in (same, other):
        d.mkdir()
        for f in source.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, d / f.name)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["added_tokens"].append({"id": 99999, "content": "<extra>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    key = reference_path(tiny_ref, SMALL, cache_dir)
    assert reference_path(replace(tiny_ref, tokenizer=str(same)), SMALL, cache_dir) == key  # a copy: same content
    assert reference_path(replace(tiny_ref, tokenizer=str(other)), SMALL, cache_dir) != key


def test_a_users_evaluation_text_is_what_the_reference_scores_and_generates_from(tiny_ref, cache_dir, tmp_path):
    """Windows, generation prompts and greedy continuations, each recomputed here with plain transformers."""
    from dataclasses import replace

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimize.reference import EVAL_TEXT

    text = tmp_path / "mine.txt"
    text.write_text(EVAL_TEXT.read_text(encoding="utf-8")[::-1][:20000], encoding="utf-8")  # other tokens
    cfg = replace(SMALL, max_tokens=256, gen_prompts=3)
    ref_dir = ensure_reference(tiny_ref, cfg, cache_dir, eval_text=str(text))
    assert ref_dir != reference_path(tiny_ref, cfg, cache_dir)  # the default text's reference is another one

    tok = AutoTokenizer.from_pretrained(tiny_ref.tokenizer)
    stream = torch.tensor(tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    info = json.loads((ref_dir / REFERENCE_JSON).read_text())
    span = len(stream) - cfg.gen_prompt_tokens
    offsets = [0, span // 3, 2 * span // 3]
    assert info["eval_text"] == str(text) and info["eval_text_tokens"] == len(stream)
    assert info["method"]["gen_prompt_offsets"] == offsets
    assert info["method"]["vocab"] == 8192 and info["method"]["context"] == cfg.context
    model = AutoModelForCausalLM.from_pretrained(tiny_ref.path, dtype=torch.float32).eval()
    prompts = torch.stack([stream[o : o + cfg.gen_prompt_tokens] for o in offsets])
    with torch.no_grad():
        greedy = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=cfg.gen_new_tokens, min_new_tokens=cfg.gen_new_tokens,
                                pad_token_id=model.config.eos_token_id)
        logprobs = torch.log_softmax(model(stream[: cfg.max_tokens].reshape(-1, cfg.context)).logits[:, :-1], -1)
    with safe_open(str(ref_dir / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), stream[: cfg.max_tokens].reshape(-1, cfg.context))
        assert torch.equal(f.get_tensor("gen_prompts"), prompts)
        assert torch.equal(f.get_tensor("gen_continuations"), greedy[:, cfg.gen_prompt_tokens :])
        torch.testing.assert_close(f.get_tensor("logprobs"), logprobs, atol=1e-5, rtol=1e-5)
    targets = stream[: cfg.max_tokens].reshape(-1, cfg.context)[:, 1:]
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).double().mean()
    assert info["reference_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


@pytest.mark.parametrize(("context", "gen_prompt", "gen_new", "needed"), [
    (1024, 16, 8, 1024),  # windows longer than the model's 512 positions
    (64, 500, 13, 513),  # a generation prompt and its continuation longer than the positions
])
def test_a_reference_longer_than_the_models_context_is_refused_before_any_work(tiny_ref, tmp_path, context,
                                                                                  gen_prompt, gen_new, needed):
    cfg = DriftConfig(context=context, max_tokens=2048, gen_prompts=1, gen_prompt_tokens=gen_prompt,
                      gen_new_tokens=gen_new)
    with pytest.raises(InputError) as exc:
        ensure_reference(tiny_ref, cfg, tmp_path)
    assert str(exc.value) == (f"drift needs sequences of {needed} tokens; model {tiny_ref.spec!r} takes at most 512")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_model_whose_config_states_no_position_limit_is_not_refused(tiny_ref, tmp_path, monkeypatch):
    """Not every architecture has ``max_position_embeddings`` (state-space models have no position limit)."""
    from optimize import models

    load = models.load_torch_model

    def without_limit(*args, **kwargs):
        model = load(*args, **kwargs)
        del model.config.max_position_embeddings
        return model

    monkeypatch.setattr(models, "load_torch_model", without_limit)
    cfg = DriftConfig(context=64, max_tokens=64, gen_prompts=1, gen_prompt_tokens=500, gen_new_tokens=13)
    ref_dir = ensure_reference(tiny_ref, cfg, tmp_path)  # 513 positions: past the config's 512, now unstated
    assert json.loads((ref_dir / REFERENCE_JSON).read_text())["method"]["windows"] == 1


def test_a_reference_exactly_as_long_as_the_models_context_is_taken(tiny_ref, tmp_path):
    cfg = DriftConfig(context=64, max_tokens=64, gen_prompts=1, gen_prompt_tokens=500, gen_new_tokens=12)
    ref_dir = ensure_reference(tiny_ref, cfg, tmp_path)  # 500 + 12 = 512 positions: fits
    assert json.loads((ref_dir / REFERENCE_JSON).read_text())["method"]["windows"] == 1


def test_reference_json_and_tensor_file_describe_the_pass(tiny_ref, drift_cache, monkeypatch):
    import re
    import time
    from datetime import datetime, timezone

    from safetensors import safe_open

    from optimize.libraries import libraries
    from optimize.reference import EVAL_TEXT
    from optimize.store import library_versions

    monkeypatch.setenv("TZ", "Etc/GMT-5")  # a host five hours east of UTC: the stamp must still be UTC
    time.tzset()
    try:
        t0 = time.perf_counter()
        before = datetime.now(timezone.utc).replace(microsecond=0)
        reference = ensure_reference(tiny_ref, SMALL, drift_cache)
        elapsed = time.perf_counter() - t0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    text = (reference / REFERENCE_JSON).read_text()
    info = json.loads(text)
    assert text.startswith('{\n "key": ') and text.endswith("}\n")  # indent 1, one key per line
    assert set(info) == {"key", "model", "eval_text", "eval_text_tokens", "settings", "device", "method",
                         "reference_perplexity", "file_bytes", "reference_wall_s", "versions", "created"}
    assert info["key"] == reference.name and info["model"] == tiny_ref.to_dict() and info["device"] == "cpu"
    assert info["eval_text"] == str(EVAL_TEXT) and info["settings"] == SMALL.reference_settings()
    windows = SMALL.max_tokens // SMALL.context
    assert info["method"] == {
        "version": METHOD_VERSION, "scoring": PROTOCOL,
        "windows": windows, "context": SMALL.context, "vocab": 8192, "scored_tokens": windows * (SMALL.context - 1),
        "gen_prompt_offsets": info["method"]["gen_prompt_offsets"],
        "logprobs": "float32 log-softmax of the fp32 reference over the full vocabulary",
        "protocol_name": "all-but-first", "first_scored_row": 0, "window_bos_token_id": None}
    assert info["file_bytes"] == (reference / REFERENCE_TENSORS).stat().st_size
    assert 0 < info["reference_wall_s"] <= elapsed + 1e-3  # the pass's own time, within this call's
    assert round(info["reference_wall_s"], 3) == info["reference_wall_s"]
    assert isinstance(info["reference_wall_s"], float)  # milliseconds kept: not rounded to whole seconds
    assert info["versions"] == library_versions(libraries("reference"))
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\dT[0-2]\d:[0-5]\d:[0-5]\dZ", info["created"]), info["created"]
    created = datetime.strptime(info["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= created <= datetime.now(timezone.utc)
    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "key": reference.name}
        assert sorted(f.keys()) == ["gen_continuations", "gen_prompts", "logprobs", "windows"]


def test_measure_drift_states_its_method_and_the_reference_it_used(tiny_ref, cache_dir, reference):
    import time

    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    t0 = time.perf_counter()
    m = measure_drift(state, reference, SMALL)
    elapsed = time.perf_counter() - t0
    method = m["drift_method"]
    info = json.loads((reference / REFERENCE_JSON).read_text())
    assert method["reference_key"] == reference.name and method["reference_device"] == "cpu"
    assert method["reference_trained"] is False  # random weights: the figures show mechanics only
    assert method["protocol"] == PROTOCOL and method["protocol_name"] == "all-but-first"
    assert method["first_scored_row"] == 0 and method["window_bos_token_id"] is None
    assert method["scoring"] == "full-window" and method["batch_windows"] == SMALL.batch_windows
    assert method["gen"] == "greedy, 8 new tokens from 2 prompts of 16"
    assert method["kld"] == "KL(reference || variant), nats, full vocabulary"
    assert method["percentiles"] == "numpy linear interpolation"
    assert method["scoring_reason"] == "no step of the recipe changes the KV cache"
    assert {k: method[k] for k in ("windows", "context", "vocab", "scored_tokens", "gen_prompt_offsets")} == {
        k: info["method"][k] for k in ("windows", "context", "vocab", "scored_tokens", "gen_prompt_offsets")}
    assert m["drift_through_cache"] is False and "through_cache" not in method
    assert 0 < m["drift_wall_s"] <= elapsed + 1e-3 and round(m["drift_wall_s"], 3) == m["drift_wall_s"]
    assert m["reference_perplexity"] == pytest.approx(info["reference_perplexity"], rel=1e-9)


def test_a_reference_of_another_model_is_refused(reference, tmp_path):
    from optimize.models import resolve_model
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    other = resolve_model("synthetic:llama-tied-tiny", tmp_path)
    state, _ = load_variant(other, Recipe(name="fp32"), "cpu", VariantStore(tmp_path))
    with pytest.raises(InputError) as exc:
        measure_drift(state, reference, SMALL)
    assert str(exc.value) == (f"the reference at {reference} is for model 'synthetic:llama-tiny', "
                              f"not 'synthetic:llama-tied-tiny'")


def test_a_reference_of_another_vocabulary_is_refused_with_both_shapes(tiny_ref, cache_dir, reference, tmp_path):
    """Same model, a reference whose log-probs cover another vocabulary (a tokenizer swapped under it)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    other = tmp_path / reference.name
    shutil.copytree(reference, other)
    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors["logprobs"] = tensors["logprobs"][..., :100].contiguous()
    save_file(tensors, str(other / REFERENCE_TENSORS), metadata=metadata)
    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    with pytest.raises(InputError) as exc:
        measure_drift(state, other, SMALL)
    assert str(exc.value) == ("variant log-probs (4, 63, 8192) do not match the reference's (4, 63, 100): "
                              "different vocabulary?")


def test_a_models_own_code_runs_in_the_reference_pass_only_when_trusted(tmp_path):
    """The reference pass loads the model itself: its own code (here a forward that raises) must need the
    user's flag there too. Untrusted, transformers builds its own Llama class from the config instead."""
    from optimize.models import resolve_model
    from optimize.reference import BUILTIN_DIR
    from tests.bench.faulty import make_faulty

    ref = resolve_model(str(make_faulty(BUILTIN_DIR, tmp_path / "own-code", fault="raise")), tmp_path / "cache")
    untrusted = ensure_reference(ref, SMALL, tmp_path / "untrusted")  # the library's Llama: no code of the model's
    assert json.loads((untrusted / REFERENCE_JSON).read_text())["method"]["scored_tokens"] == 16 * 63
    with pytest.raises(RuntimeError, match="faulty model: forward raised on purpose"):
        ensure_reference(ref, SMALL, tmp_path / "trusted", trust_remote_code=True)


def test_non_finite_logits_stop_the_pass_naming_how_many_positions_and_which_windows():
    """A variant that overflows (fp16 on some models) must fail drift, not score NaN as a figure."""
    from types import SimpleNamespace

    from bench.metrics.drift import _logprob_batches

    windows = torch.arange(20).reshape(5, 4)  # 5 windows of 4 tokens: 3 scored rows each

    def model(input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 5)  # vocabulary 5
        if int(input_ids[0, 0]) == 8:  # the batch holding windows 2 and 3
            logits[1, 0, 2] = logits[1, 2, 2] = float("nan")  # window 3, rows 0 and 2, one vocabulary entry
        return SimpleNamespace(logits=logits)

    batches = _logprob_batches(model, windows, 2, "cpu", "onnxruntime")
    start, lp = next(batches)
    assert start == 0 and lp.shape == (2, 3, 5)
    with pytest.raises(RuntimeError) as exc:
        next(batches)
    assert str(exc.value) == "the model produced non-finite logits at 2 of 6 positions (windows 2..3)"


def test_the_reference_key_is_the_documented_payloads_hash(tiny_ref, tmp_path):
    """Cached references stay valid across releases only while this payload and hash do not change."""
    import hashlib

    from optimize.libraries import libraries
    from optimize.store import library_versions

    text = tmp_path / "text.txt"
    text.write_text("def f():\n    return 1\n", encoding="utf-8")
    tokenizer = hashlib.sha256()
    for path in sorted(Path(tiny_ref.tokenizer).iterdir()):
        if path.is_file() and path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            tokenizer.update(path.name.encode() + b"\0" + path.read_bytes())
    payload = {"model": tiny_ref.fingerprint, "tokenizer": tokenizer.hexdigest(),
               "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest(), **SMALL.reference_settings(),
               "device": "cuda", "versions": library_versions(libraries("reference")),
               "method_version": METHOD_VERSION}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    assert reference_path(tiny_ref, SMALL, tmp_path, "cuda", str(text)) == tmp_path / "drift" / key


def test_random_weights_setting_is_validated_and_left_out_of_a_matrix_description_at_its_default():
    from bench.matrix import parse_matrix
    from bench.orchestrate import matrix_hash

    with pytest.raises(InputError) as exc:
        DriftConfig(random_weights="maybe").validate()
    assert str(exc.value) == "drift random_weights must be one of 'score', 'skip', got 'maybe'"
    base = {"name": "m", "models": ["synthetic:llama-tiny"], "variants": ["fp32"]}
    default = parse_matrix(base, "m.toml")
    scored = parse_matrix({**base, "drift": {"random_weights": "score"}}, "m.toml")
    skipped = parse_matrix({**base, "drift": {"random_weights": "skip"}}, "m.toml")
    # a run recorded before the setting existed describes (and hashes) its matrix as it did
    assert "random_weights" not in default.to_dict()["drift"] and matrix_hash(default) == matrix_hash(scored)
    assert skipped.to_dict()["drift"]["random_weights"] == "skip" and matrix_hash(skipped) != matrix_hash(default)


@pytest.mark.slow
def test_random_weights_skip_skips_drift_and_the_reference_pass_of_random_models_only(tmp_path, cache_dir):
    """A speed-only model in a matrix with a trained one: its cells say why they have no drift, the trained one's
    cells measure it; no reference pass is spent on the random model."""
    import json
    import subprocess
    import sys

    matrix = tmp_path / "m.toml"
    matrix.write_text('name = "m"\nmodels = ["synthetic:llama-tiny", "builtin:pycode"]\nvariants = ["fp32"]\n'
                      'devices = ["cpu"]\n[[scenarios]]\nname = "generate"\nbatch_size = [1]\nprompt_tokens = [16]\n'
                      'new_tokens = [4]\n[measure]\nwarmup = 0\nmin_reps = 2\nmax_reps = 2\nbudget_s = 0\n'
                      'roofline = false\n[drift]\ncontext = 64\nmax_tokens = 256\ngen_prompts = 2\n'
                      'gen_new_tokens = 4\nrandom_weights = "skip"\n')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--out", str(out), "--quiet",
                           "--cache-dir", str(cache_dir), "--no-report"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["model"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    tiny, trained = records["synthetic:llama-tiny"], records["builtin:pycode"]
    assert tiny["status"] == trained["status"] == "ok"
    assert tiny["drift_skipped"] == ('synthetic:llama-tiny has random weights and [drift] random_weights is "skip": '
                                     "its drift would test the mechanics only")
    assert tiny["method"]["drift"] == {"skipped": tiny["drift_skipped"]} and "kld_mean" not in tiny["metrics"]
    assert "drift_skipped" not in trained and trained["drift_ok"] is True and trained["metrics"]["kld_mean"] == 0.0
    # each reference job's model and outcome (the trained model's may be stored already: then it ran no job)
    jobs = {json.loads(spec.read_text())["model"]: json.loads(spec.with_name(spec.name.replace(".json", ".out.json"))
                                                             .read_text())
            for spec in (out / "logs").glob("*.reference.json")}
    assert jobs["synthetic:llama-tiny"]["status"] == "skipped"
    assert jobs["synthetic:llama-tiny"]["error"] == tiny["drift_skipped"]
    assert jobs.get("builtin:pycode", {"status": "ok"})["status"] == "ok"
