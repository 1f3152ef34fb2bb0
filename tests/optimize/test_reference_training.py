"""The reference-model path: corpus split, tokenizer, a few training steps, a loadable model directory."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from optimize.reference.corpus import CorpusConfig, build_corpus, is_held_out
from optimize.reference.train import TrainConfig, lr_at, train_reference

TINY = TrainConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128, seq_len=32, batch_size=4, steps=6, warmup_steps=2, eval_context=32,
                   log_every=2)


@pytest.fixture(scope="module")
def small_stdlib(tmp_path_factory) -> Path:
    """A few real stdlib modules, so the test reads real Python quickly."""
    root = tmp_path_factory.mktemp("stdlib")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc.py", "bisect.py", "colorsys.py", "copy.py", "heapq.py", "keyword.py", "numbers.py",
                 "opcode.py", "queue.py", "sched.py", "shlex.py", "string.py", "textwrap.py", "this.py"):
        shutil.copy(stdlib / name, root / name)
    return root


SPLIT_SCRIPT = """
import json, sys
from optimize.reference.corpus import is_held_out
print(json.dumps([is_held_out(f"pkg/mod{i}.py", 0.3) for i in range(300)]))
"""


def test_split_is_identical_across_processes_with_different_hash_seeds():
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                             check=True).stdout
        runs.append(json.loads(out))
    here = [is_held_out(f"pkg/mod{i}.py", 0.3) for i in range(300)]
    assert runs[0] == runs[1] == here
    assert 60 < sum(here) < 120  # about 30% held out


def test_split_is_the_sha256_fraction_of_the_path():
    import hashlib

    # sha256("json/decoder.py") begins with these 8 bytes; as a fraction of 2**64 it is the split key.
    key = int.from_bytes(hashlib.sha256(b"json/decoder.py").digest()[:8], "big") / 2**64
    assert is_held_out("json/decoder.py", key + 1e-9) and not is_held_out("json/decoder.py", key)
    assert not is_held_out("json/decoder.py", 0.0) and is_held_out("json/decoder.py", 1.0)
    held = sum(is_held_out(f"pkg/mod{i}.py", 0.05) for i in range(4000))
    assert 150 < held < 250  # 5% of 4000 = 200, binomial sd ~14


def test_corpus_is_deterministic_and_split_by_file(small_stdlib):
    cfg = CorpusConfig(root=str(small_stdlib), eval_fraction=0.3)
    a, b = build_corpus(cfg), build_corpus(cfg)
    assert a.manifest["train_sha256"] == b.manifest["train_sha256"] and a.train_text == b.train_text
    splits = {f["path"]: f["split"] for f in a.manifest["files"]}
    assert set(splits.values()) == {"train", "eval"}
    for path, split in splits.items():
        text = (small_stdlib / path).read_text()
        assert (text in a.train_text) == (split == "train")


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_fraction=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)


def test_train_reference_writes_a_loadable_model_directory(small_stdlib, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    summary = train_reference(out, TINY, CorpusConfig(root=str(small_stdlib), eval_fraction=0.3),
                              progress=lambda _: None)
    assert summary["steps"] == 6 and summary["eval_perplexity"] > 1
    assert summary["log"][0]["loss"] > summary["log"][-1]["loss"]  # it learns something in six steps
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "eval.txt",
                 "README.md", "corpus-manifest.json", "training.json"):
        assert (out / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.num_parameters() == summary["parameters"]
    ids = tok("def f(x):\n", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert "held-out perplexity" in (out / "README.md").read_text()
