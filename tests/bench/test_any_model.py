"""A user's own model through the command line: GPT-2 saved without a tokenizer, small vocabulary.

The path a new user takes (issue: every GPT-2 cell failed in the optional roofline step,
prune-50 pruned nothing and was ``ok``, int8 grew the weights, a model without a tokenizer
could not get prompts). Cells run in their own processes, as ``infermatrix run`` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import kernel_refuses_peak_reset

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random GPT-2 (Conv1D layers, tied head) with vocabulary 1000 and no tokenizer files."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from optimize.models import SYNTHETIC, synthetic_config

    arch = dataclasses.replace(SYNTHETIC["gpt2-tiny"], vocab_size=1000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic_config(arch))
    path = tmp_path_factory.mktemp("my-gpt2")
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args], capture_output=True, text=True,
                          timeout=900)


def _records(out) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {r["variant"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_gpt2_without_tokenizer_runs_every_cell_with_random_prompts(gpt2_dir, tmp_path, cache_dir):
    from bench.results import validate_record

    out = tmp_path / "run"
    proc = _run("--model", str(gpt2_dir), "--variants", "fp32,prune-50,torch-int8-dynamic", "--device", "cpu",
                "--batch-size", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--min-reps", "2",
                "--max-reps", "2", "--warmup", "0", "--budget-s", "0", "--out", str(out), "--quiet")
    records = _records(out)
    assert set(records) == {"fp32", "prune-50", "torch-int8-dynamic"}, proc.stderr[-2000:]
    for name, record in records.items():
        assert record["status"] == "ok", (name, record["error"])
        validate_record(record)
        assert record["method"]["prompt_source"] == "random"
        assert "no tokenizer" in record["drift_skipped"] and "--tokenizer DIR" in record["drift_skipped"]
        metrics = record["metrics"]
        assert metrics["prefill_tflops"] > 0 and metrics["decode_bandwidth_gbps"] > 0  # roofline on GPT-2
        # 2 layers x 4 heads x 16 head dims x K and V x 4 bytes, read off the real cache
        assert metrics["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
        # The cell's peak covers its load and its run, each measured in its own window.
        assert metrics["load_peak_memory_bytes"] <= metrics["peak_memory_bytes"]
        assert ("serving_peak_memory_bytes" in metrics) == (kernel_refuses_peak_reset() is None)
        assert metrics.get("serving_peak_memory_bytes", 0) <= metrics["peak_memory_bytes"]
    manifests = [json.loads(p.read_text()) for p in (cache_dir / "variants").glob("*/manifest.json")]
    [manifest] = [m for m in manifests if m["recipe"]["name"] == "prune-50"
                  and m["model"]["path"] == str(gpt2_dir.resolve())]
    magnitude = next(r for r in manifest["reports"] if r["technique"] == "prune-magnitude")
    assert magnitude["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert magnitude["modules_touched"] == 8  # the Conv1D layers: c_attn, c_proj, c_fc, mlp.c_proj per block
    int8 = next(r for r in records["torch-int8-dynamic"]["build"]["reports"] if r["technique"] == "torch-int8-dynamic")
    assert int8["modules_touched"] == 8 and int8["conv1d_converted"] == 8
    assert int8["bytes_after"] < int8["bytes_before"]
    assert int8["lm_head"].startswith("not quantized (tied")
    assert records["torch-int8-dynamic"]["metrics"]["weights_bytes"] < records["fp32"]["metrics"]["weights_bytes"]


def _forked_nothing(cache) -> bool:
    """True when no command using ``cache`` started the fork server (it writes its preload.log there)."""
    from bench.preload import PRELOAD_LOG

    return not (cache / PRELOAD_LOG).exists()


def test_eval_text_prompts_without_a_tokenizer_is_one_line_exit_2(gpt2_dir, tmp_path):
    """Refused before the fork server starts, not a failed record per cell with the same cause."""
    import os

    out, cache = tmp_path / "r", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", str(gpt2_dir), "--variants",
                           "fp32,bf16", "--device", "cpu", "--prompt-source", "eval-text", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "INFERMATRIX_CACHE": str(cache)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line == (f"infermatrix run: error: prompt_source 'eval-text': model {str(gpt2_dir)!r} has no tokenizer: "
                    "text-based steps need one (give a tokenizer directory with --tokenizer DIR)")
    assert not out.exists() and _forked_nothing(cache)


def test_the_text_prompt_check_refuses_only_a_model_known_to_lack_a_tokenizer(gpt2_dir, tiny_ref, tmp_path):
    from dataclasses import replace

    from bench.commands.run import _check_text_prompts
    from bench.matrix import load_matrix, narrow
    from optimize.errors import InputError

    def matrix(models, source="eval-text", tokenizer=None):
        return replace(narrow(load_matrix(), models=models, variants=["fp32"], prompt_source=source),
                       tokenizer=tokenizer)

    no_tok = replace(tiny_ref, spec="org/no-tokenizer", tokenizer=None)
    with pytest.raises(InputError, match=f"^prompt_source 'eval-text': model {str(gpt2_dir)!r} has no tokenizer"):
        _check_text_prompts(matrix(["synthetic:llama-tiny", str(gpt2_dir)]), {})
    with pytest.raises(InputError, match="^prompt_source 'eval-text': model 'org/no-tokenizer' has no tokenizer"):
        _check_text_prompts(matrix(["org/no-tokenizer"]), {"org/no-tokenizer": no_tok})
    _check_text_prompts(matrix([str(gpt2_dir)], source="auto"), {})  # random prompts for it
    _check_text_prompts(matrix([str(gpt2_dir)], tokenizer=tiny_ref.tokenizer), {})  # --tokenizer stands in
    _check_text_prompts(matrix(["builtin:pycode", "synthetic:llama-134m", "org/has-one"]), {"org/has-one": tiny_ref})

def test_tokenizer_flag_must_name_a_tokenizer_directory(tmp_path):
    proc = _run("--tokenizer", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("infermatrix run: error: --tokenizer")


def test_prompt_source_random_is_seeded_and_within_the_vocabulary(tiny_ref):
    from bench.prompts import prompt_ids

    a, source = prompt_ids(tiny_ref, 50, 3, 20, seed=4, source="random")
    b, _ = prompt_ids(tiny_ref, 50, 3, 20, seed=4, source="random")
    assert source == "random" and a.shape == (3, 20) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 50


def test_tokenizer_dir_gives_a_tokenizerless_model_text_prompts(gpt2_dir):
    from bench.prompts import prompt_ids
    from optimize.models import BUILTIN_DIR, resolve_model

    bare = resolve_model(str(gpt2_dir))
    assert bare.tokenizer is None
    assert prompt_ids(bare, 1000, 1, 8)[1] == "random"
    with_tok = resolve_model(str(gpt2_dir), tokenizer=str(BUILTIN_DIR))
    # The built-in tokenizer's ids go up to 8192: too many for this vocabulary, said in one line.
    from optimize.errors import InputError

    with pytest.raises(InputError, match="vocabulary 1000, too small"):
        prompt_ids(with_tok, 1000, 1, 8, source="eval-text")
    ids, source = prompt_ids(with_tok, 8192, 1, 8)
    assert source == "eval-text" and ids.shape == (1, 8)


def _hub_env(tmp_path) -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_HOME": str(tmp_path / "hf-home")}


def _hub_snapshot(tiny_ref, tmp_path):
    """The tiny model in an offline hub cache under the id testorg/tiny-llama; returns its snapshot folder."""
    import shutil
    from pathlib import Path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--testorg--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for source in (Path(tiny_ref.path), Path(tiny_ref.tokenizer)):
        for f in source.iterdir():
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.slow
def test_a_hub_id_found_in_the_offline_hub_cache_runs(tiny_ref, tmp_path, cache_dir):
    """The hub path of a user without network: the model sits in the hub cache under its id."""
    snapshot = _hub_snapshot(tiny_ref, tmp_path)
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", "testorg/tiny-llama", "--variants",
                           "fp32", "--device", "cpu", "--batch-size", "1", "--prompt-tokens", "8", "--new-tokens", "2",
                           "--no-drift", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900,
                          env=_hub_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fetching hub model testorg/tiny-llama" in proc.stderr
    record = _records(out)["fp32"]
    assert record["status"] == "ok" and record["model"] == "testorg/tiny-llama"
    assert record["model_info"]["path"] == str(snapshot) and record["model_info"]["tokenizer"] == str(snapshot)
    assert record["method"]["prompt_source"].startswith("eval")


def test_an_unreachable_hub_id_is_one_line_exit_2_before_any_cell(tmp_path):
    """Seen: the run measured the roofline, then failed every cell with the same cut-off loader message."""
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", "testorg/not-there", "--variants",
                           "fp32", "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**_hub_env(tmp_path), "INFERMATRIX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("infermatrix run: error: model 'testorg/not-there' is neither") and "hub id" in last
    assert "roofline" not in proc.stderr and not out.exists()
    assert _forked_nothing(tmp_path / "cache")  # refused before the fork server's imports


@pytest.mark.slow
def test_a_resumed_run_fetches_the_hub_models_its_remaining_cells_need(tiny_ref, tmp_path, cache_dir):
    """A resume whose hub cache was cleared: exit 2 at once, not a failed record per cell; with the model
    back it runs what is left; a run with nothing left needs no model."""
    import shutil

    _hub_snapshot(tiny_ref, tmp_path)
    out, hub, away = tmp_path / "r", tmp_path / "hub", tmp_path / "hub-away"
    run = [sys.executable, "-m", "bench.cli", "run", "--model", "testorg/tiny-llama", "--variants", "fp32,bf16",
           "--device", "cpu", "--batch-size", "1", "--prompt-tokens", "8", "--new-tokens", "2", "--no-drift",
           "--no-report", "--min-reps", "2", "--max-reps", "2", "--out", str(out), "--quiet"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=900, env=_hub_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["variant"] == "fp32"]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")  # as if killed before bf16's cell
    resume = [sys.executable, "-m", "bench.cli", "run", "--resume", str(out), "--quiet", "--no-report"]

    hub.rename(away)
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=_hub_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("infermatrix run: error: model 'testorg/tiny-llama'")
    assert (out / "results.jsonl").read_text().splitlines() == kept  # no failed record appended

    away.rename(hub)
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=900, env=_hub_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fetching hub model testorg/tiny-llama" in proc.stderr
    assert {v: r["status"] for v, r in _records(out).items()} == {"fp32": "ok", "bf16": "ok"}

    shutil.rmtree(hub)
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=_hub_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fetching hub model" not in proc.stderr
