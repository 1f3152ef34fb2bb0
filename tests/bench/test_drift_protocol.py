"""llama-perplexity's scoring protocol (BOS-led windows, second half scored), checked against plain transformers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.metrics.drift import (
    PROTOCOL,
    PROTOCOL_LLAMA_CPP,
    REFERENCE_JSON,
    REFERENCE_TENSORS,
    DriftConfig,
    ensure_reference,
    measure_drift,
    reference_path,
)
from bench.report.markdown import md_escape
from optimize.errors import InputError

# 8 windows of 64 tokens: rows 32..62 of each window are scored under llama.cpp's protocol (31 tokens).
SMALL = DriftConfig(context=64, max_tokens=512, batch_windows=4, gen_prompts=2, gen_prompt_tokens=16,
                    gen_new_tokens=8)
LLAMA_CPP = replace(SMALL, protocol="llama.cpp")
FIRST, SCORED_PER_WINDOW, WINDOWS = 32, 31, 8


def _plain_windows(tokenizer_dir: str) -> tuple[torch.Tensor, int | None]:
    """The evaluation windows cut here, with llama-perplexity's BOS where this tokenizer adds one."""
    from transformers import AutoTokenizer

    from optimize.reference import EVAL_TEXT

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    windows = torch.tensor(ids[: WINDOWS * SMALL.context]).reshape(WINDOWS, SMALL.context)
    adds = tok("def", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
    bos = tok.bos_token_id if adds else None
    if bos is not None:
        windows[:, 0] = bos
    return windows, bos


def _plain_logprobs(model_dir: str, windows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(dtype)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), dim=-1)  # row t predicts t+1


def _fp32(ref, cache_dir, *steps):
    from optimize.recipe import Recipe
    from optimize.store import VariantStore, load_variant

    return load_variant(ref, Recipe(name="under-test", steps=steps), "cpu", VariantStore(cache_dir))[0]


def test_llama_cpp_reference_scores_the_second_half_of_bos_led_windows_like_transformers(bos_ref, cache_dir, tmp_path):
    reference = ensure_reference(bos_ref, LLAMA_CPP, tmp_path)
    windows, bos = _plain_windows(bos_ref.tokenizer)
    assert bos is not None
    full = _plain_logprobs(bos_ref.path, windows)
    scored = full[:, FIRST:]  # rows 32..62 predict tokens 33..63
    nll = -scored.gather(-1, windows[:, FIRST + 1 :].unsqueeze(-1)).double()
    info = json.loads((reference / REFERENCE_JSON).read_text())
    assert info["reference_perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert info["settings"] == {**SMALL.reference_settings(), "protocol": "llama.cpp"}
    method = info["method"]
    assert method["scored_tokens"] == WINDOWS * SCORED_PER_WINDOW
    assert (method["protocol_name"], method["first_scored_row"], method["window_bos_token_id"]) == \
        ("llama.cpp", FIRST, bos)
    assert method["scoring"] == PROTOCOL_LLAMA_CPP
    from safetensors import safe_open

    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), windows)
        assert tuple(f.get_slice("logprobs").get_shape()) == (WINDOWS, SCORED_PER_WINDOW, 8192)
        torch.testing.assert_close(f.get_tensor("logprobs"), scored, atol=1e-5, rtol=1e-5)

    m = measure_drift(_fp32(bos_ref, cache_dir), reference, LLAMA_CPP)
    assert m["scored_tokens"] == WINDOWS * SCORED_PER_WINDOW
    assert m["kld_max"] < 1e-6 and m["top1_agreement"] == 1.0
    assert m["perplexity"] == pytest.approx(info["reference_perplexity"], rel=1e-6)
    assert m["drift_method"]["protocol"] == PROTOCOL_LLAMA_CPP
    assert m["drift_method"]["protocol_name"] == "llama.cpp" and m["drift_method"]["first_scored_row"] == FIRST


def test_the_bos_comes_from_the_tokenizer_adding_one_not_from_defining_one(tiny_ref, bos_ref, cache_dir, tmp_path):
    from transformers import AutoTokenizer

    from optimize.models import added_bos_token_id

    plain = AutoTokenizer.from_pretrained(tiny_ref.tokenizer)
    assert plain.bos_token_id is not None  # defined, but not put before a text: GPT-2's case
    assert added_bos_token_id(tiny_ref) is None
    assert added_bos_token_id(bos_ref) == plain.bos_token_id
    reference = ensure_reference(tiny_ref, LLAMA_CPP, tmp_path)
    windows, bos = _plain_windows(tiny_ref.tokenizer)
    assert bos is None
    from safetensors import safe_open

    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), windows)  # the text's own first tokens kept
    assert json.loads((reference / REFERENCE_JSON).read_text())["method"]["window_bos_token_id"] is None
    # a tokenizer that adds BOS gets none under the default protocol: its windows are the text's own tokens
    default = ensure_reference(bos_ref, SMALL, tmp_path / "default")
    with safe_open(str(default / REFERENCE_TENSORS), framework="pt") as f:
        assert torch.equal(f.get_tensor("windows"), windows)
    assert json.loads((default / REFERENCE_JSON).read_text())["method"]["window_bos_token_id"] is None


def test_a_variants_drift_under_each_protocol_is_its_figures_over_that_protocols_rows(tiny_ref, cache_dir, tmp_path):
    """bf16's KLD and perplexity, from plain fp32 and bf16 forwards: all rows, then rows 32.. only."""
    from bench.metrics.drift_figures import kl_divergence
    from optimize.quantize.cast import Cast

    windows, _ = _plain_windows(tiny_ref.tokenizer)
    ref_lp = _plain_logprobs(tiny_ref.path, windows)
    var_lp = _plain_logprobs(tiny_ref.path, windows, torch.bfloat16)
    kld = kl_divergence(ref_lp.double(), var_lp.double())  # (W, 63)
    nll = -var_lp.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1).double()
    state = _fp32(tiny_ref, cache_dir, Cast(dtype="bfloat16"))
    for cfg, first in ((SMALL, 0), (LLAMA_CPP, FIRST)):
        m = measure_drift(state, ensure_reference(tiny_ref, cfg, tmp_path), cfg)
        assert m["scored_tokens"] == WINDOWS * (SMALL.context - 1 - first)
        assert m["kld_mean"] == pytest.approx(float(kld[:, first:].mean()), rel=2e-2, abs=1e-7)
        assert m["perplexity"] == pytest.approx(math.exp(float(nll[:, first:].mean())), rel=1e-3)
        assert m["drift_method"]["protocol"] == (PROTOCOL if first == 0 else PROTOCOL_LLAMA_CPP)
    assert float(kld[:, FIRST:].mean()) != pytest.approx(float(kld.mean()), rel=1e-3)  # the two differ


def test_through_the_cache_the_llama_cpp_protocol_scores_the_same_rows(tiny_ref, cache_dir, tmp_path, monkeypatch):
    from bench.metrics.drift_incremental import CacheScorer

    asked = []
    method = CacheScorer.method

    def spy(self, windows, first_scored_row=0):
        asked.append((windows, first_scored_row))
        return method(self, windows, first_scored_row)

    monkeypatch.setattr(CacheScorer, "method", spy)
    cfg = replace(LLAMA_CPP, scoring="through-cache")
    reference = ensure_reference(tiny_ref, LLAMA_CPP, tmp_path)
    m = measure_drift(_fp32(tiny_ref, cache_dir), reference, cfg)
    assert asked == [(WINDOWS, FIRST)]  # quantized reads are counted over the scored rows only
    assert m["drift_kv_quantized_scored_tokens"] == 0  # observed, and a dynamic fp32 cache holds none
    assert m["drift_through_cache"] is True and m["scored_tokens"] == WINDOWS * SCORED_PER_WINDOW
    assert m["kld_max"] < 1e-5 and m["top1_agreement"] == 1.0
    through = m["drift_method"]["through_cache"]  # the figures came through the cache, a step per token
    assert through["steps_per_window"] == SMALL.context - 1 and through["batch_windows"] >= 1
    # the cache path's batch (all 8 windows fit its logits budget), not the config's 4
    assert m["drift_method"]["batch_windows"] == through["batch_windows"] != cfg.batch_windows
    assert through["cache"]["class"] == "DynamicCache"


def test_quantized_reads_are_counted_over_scored_rows_only():
    from bench.metrics.drift_incremental import CacheScorer

    state = SimpleNamespace(generate_kwargs={}, device="cpu", decoder=None)
    scorer = CacheScorer(state)
    # 3 windows in batches of 2, 4 steps per window: steps 0..3 read 0, 2, 3, 4 quantized positions
    scorer.batch, scorer.steps_per_window, scorer.observed = 2, 4, True
    scorer.probe.quantized_before = [0, 2, 3, 4] * 2
    every = scorer.method(3)
    assert every["scored_tokens_reading_quantized"] == 3 * 3  # steps 1, 2, 3 of each of the 3 windows
    assert every["quantized_positions_read_mean"] == pytest.approx((0 + 2 + 3 + 4) / 4)
    second_half = scorer.method(3, first_scored_row=2)
    assert second_half["scored_tokens_reading_quantized"] == 3 * 2  # steps 2 and 3 only
    assert second_half["quantized_positions_read_mean"] == pytest.approx((3 + 4) / 2)


def test_protocol_setting_is_validated_and_named_in_the_reference_key_only_when_not_the_default(tiny_ref, tmp_path):
    from bench.matrix import narrow, parse_matrix

    with pytest.raises(InputError) as exc:
        DriftConfig(protocol="llama").validate()
    assert str(exc.value) == "drift protocol must be one of 'all-but-first', 'llama.cpp', got 'llama'"
    with pytest.raises(InputError, match="context must be >= 3 under the llama.cpp protocol"):
        DriftConfig(context=2, max_tokens=8, protocol="llama.cpp").validate()
    DriftConfig(context=3, max_tokens=9, protocol="llama.cpp").validate()
    assert replace(SMALL, context=3, protocol="llama.cpp").first_scored_row == 1
    assert SMALL.first_scored_row == 0 and LLAMA_CPP.first_scored_row == FIRST
    assert "protocol" not in SMALL.reference_settings()  # references cached before the setting keep their keys
    assert LLAMA_CPP.reference_settings()["protocol"] == "llama.cpp"
    assert reference_path(tiny_ref, LLAMA_CPP, tmp_path) != reference_path(tiny_ref, SMALL, tmp_path)

    base = {"models": ["synthetic:llama-tiny"], "variants": ["fp32"]}
    assert parse_matrix({**base, "drift": {"protocol": "llama.cpp"}}, "m.toml").drift.protocol == "llama.cpp"
    with pytest.raises(InputError, match="m.toml.*drift protocol must be one of"):
        parse_matrix({**base, "drift": {"protocol": "half"}}, "m.toml")
    matrix = parse_matrix({**base, "drift": {"context": 64, "max_tokens": 128}}, "m.toml")
    narrowed = narrow(matrix, drift_protocol="llama.cpp")
    assert narrowed.drift == replace(matrix.drift, protocol="llama.cpp")
    assert narrow(matrix, drift=False, drift_protocol="llama.cpp").drift.enabled is False
    with pytest.raises(InputError, match="with the command-line flags.*drift protocol"):
        narrow(matrix, drift_protocol="half")
    with pytest.raises(InputError, match="context must be >= 3"):
        narrow(parse_matrix({**base, "drift": {"context": 2, "max_tokens": 8}}, "m.toml"), drift_protocol="llama.cpp")


@pytest.mark.slow
def test_a_run_with_the_llama_cpp_protocol_says_so_in_records_and_reports(tmp_path, cache_dir):
    """The user's path: `infermatrix run --drift-protocol llama.cpp` on the built-in model, then its reports."""
    matrix = tmp_path / "m.toml"
    matrix.write_text('name = "protocol"\nmodels = ["builtin:pycode"]\nvariants = ["fp32", "bf16"]\n'
                      'devices = ["cpu"]\n'
                      '[[scenarios]]\nname = "generate"\nbatch_size = [1]\nprompt_tokens = [16]\nnew_tokens = [4]\n'
                      '[measure]\nwarmup = 0\nmin_reps = 1\nmax_reps = 1\nbudget_s = 0\nroofline = false\n'
                      '[drift]\ncontext = 64\nmax_tokens = 512\ngen_prompts = 2\ngen_prompt_tokens = 16\n'
                      'gen_new_tokens = 8\n')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--drift-protocol", "llama.cpp",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(records) == ["bf16", "fp32"]
    for r in records.values():
        assert r["status"] == "ok", r.get("error")
        drift = r["method"]["drift"]
        assert (drift["protocol_name"], drift["first_scored_row"]) == ("llama.cpp", FIRST)
        assert drift["protocol"] == PROTOCOL_LLAMA_CPP
        assert r["metrics"]["scored_tokens"] == WINDOWS * SCORED_PER_WINDOW
    assert records["fp32"]["metrics"]["kld_mean"] < 1e-6 < records["bf16"]["metrics"]["kld_mean"]
    line = f"- Drift protocol: llama.cpp, windows of 64 tokens, {WINDOWS * SCORED_PER_WINDOW} scored tokens: "
    said = md_escape(PROTOCOL_LLAMA_CPP.replace("`context`", "64"))  # the window length as its number
    assert "windows of 64 tokens from the start" in said and "`" not in PROTOCOL_LLAMA_CPP.replace("`context`", "")
    assert line + said + "\n" in (out / "report.md").read_text()  # once: both share it
    assert (out / "report.md").read_text().count("- Drift protocol:") == 1
    assert "<h2>Drift protocol</h2>" in (out / "report.html").read_text()
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["drift_protocol"] for row in rows] == ["llama.cpp", "llama.cpp"]
    from bench.report.write import render

    (group,) = json.loads(render(out, "json"))["groups"]
    assert [row["drift_protocol"] for row in group["rows"]] == ["llama.cpp", "llama.cpp"]

    bad = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--drift-protocol", "half",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--drift-protocol" in bad.stderr and not (tmp_path / "bad").exists()


def test_a_reference_cached_before_the_protocol_setting_reads_as_all_but_first(tiny_ref, cache_dir, tmp_path):
    """Older reference.json files lack the protocol's keys; their figures are all-but-first ones."""
    built = ensure_reference(tiny_ref, SMALL, tmp_path / "cache")
    old = tmp_path / built.name
    shutil.copytree(built, old)
    info = json.loads((old / REFERENCE_JSON).read_text())
    for key in ("protocol_name", "first_scored_row", "window_bos_token_id"):
        del info["method"][key]
    (old / REFERENCE_JSON).write_text(json.dumps(info))
    method = measure_drift(_fp32(tiny_ref, cache_dir), old, SMALL)["drift_method"]
    assert (method["protocol_name"], method["first_scored_row"], method["window_bos_token_id"]) == \
        ("all-but-first", 0, None)
    assert method["protocol"] == PROTOCOL


OWN_TOKENIZER = '''
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast


class OwnTokenizer(PreTrainedTokenizerFast):
    """A tokenizer with code of its own: it puts BOS before every text it encodes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer.post_processor = TemplateProcessing(
            single=f"{self.bos_token} $A", special_tokens=[(self.bos_token, self.bos_token_id)])
'''


def test_a_tokenizers_own_code_loads_in_the_reference_pass_only_when_trusted(tmp_path):
    """The reference pass loads the tokenizer twice (the evaluation ids, the BOS it adds): a tokenizer
    that ships its own class must get the user's trust_remote_code at both, or the pass cannot load it."""
    from optimize.models import resolve_model
    from optimize.reference import BUILTIN_DIR

    model_dir = tmp_path / "own-tokenizer"
    shutil.copytree(BUILTIN_DIR, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "OwnTokenizer"  # no such class in transformers: only the model's code has it
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_own.OwnTokenizer"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "tokenization_own.py").write_text(OWN_TOKENIZER)
    ref = resolve_model(str(model_dir), tmp_path / "cache")

    built = ensure_reference(ref, LLAMA_CPP, tmp_path / "trusted", trust_remote_code=True)
    method = json.loads((built / REFERENCE_JSON).read_text())["method"]
    assert method["window_bos_token_id"] == 0  # the own class's BOS: its code ran
    assert method["scored_tokens"] == WINDOWS * SCORED_PER_WINDOW
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        ensure_reference(ref, LLAMA_CPP, tmp_path / "untrusted")
