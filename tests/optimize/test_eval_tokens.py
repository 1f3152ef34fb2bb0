"""The evaluation text is encoded once per text, tokenizer and library versions, then read back."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from optimize import models
from optimize.errors import InputError


def _encoded(ref, text=None) -> torch.Tensor:
    """What the tokenizer itself gives, bypassing any cache."""
    tok = models.load_tokenizer(ref)
    content = models.eval_text_path(text).read_text(encoding="utf-8")
    return torch.tensor(tok(content, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _no_tokenizer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded: the ids were not read from the cache")

    monkeypatch.setattr(models, "load_tokenizer", refuse)


def test_ids_are_stored_then_read_back_without_the_tokenizer(tiny_ref, tmp_path, monkeypatch):
    expected = _encoded(tiny_ref)
    first = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    [entry] = (tmp_path / "tokens").glob("*.npy")
    assert torch.equal(first, expected) and first.dtype == torch.long
    _no_tokenizer(monkeypatch)
    again = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    assert torch.equal(again, expected)
    assert list((tmp_path / "tokens").iterdir()) == [entry]  # no temporary left beside it
    # the vocabulary check holds for ids read back as for ids just encoded
    with pytest.raises(InputError, match="too small for the ids of tokenizer"):
        models.eval_token_ids(tiny_ref, int(expected.max()), cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["torn", "float", "two-dimensional", "empty", "negative"])
def test_a_damaged_entry_is_encoded_again_and_rewritten(tiny_ref, tmp_path, damage):
    expected = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    [entry] = (tmp_path / "tokens").glob("*.npy")
    if damage == "torn":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        bad = {"float": expected.numpy().astype(np.float32), "two-dimensional": expected.numpy()[:10].reshape(2, 5),
               "empty": np.zeros(0, np.int64), "negative": np.full(4, -1, np.int64)}[damage]
        with entry.open("wb") as f:
            np.save(f, bad)
    assert torch.equal(models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path), expected)
    assert np.array_equal(np.load(entry), expected.numpy())


def test_the_key_follows_the_text_the_tokenizer_files_and_trust_remote_code_not_the_weights(tiny_ref, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_ref.tokenizer, tok_dir)
    text = b"def f(x):\n    return x\n"

    def key(directory=tok_dir, content=text, trust=False):
        return models._token_cache_path(directory, content, trust, tmp_path / "cache")

    base = key()
    assert base.parent == tmp_path / "cache" / "tokens"
    assert key() == base
    assert key(content=text + b"#") != base
    assert key(trust=True) != base
    (tok_dir / "model.safetensors").write_bytes(b"weights are not part of the tokenizer")
    assert key() == base
    config = next(tok_dir.glob("tokenizer*.json"))
    config.write_bytes(config.read_bytes() + b" ")
    assert key() != base
    assert models._token_cache_path(tmp_path / "not-a-directory", text, False, tmp_path / "cache") is None


def test_another_text_is_its_own_entry(tiny_ref, tmp_path, monkeypatch):
    text = tmp_path / "eval.txt"
    text.write_text("x = 1\n" * 400, encoding="utf-8")
    builtin = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    own = models.eval_token_ids(tiny_ref, 8192, str(text), cache_dir=tmp_path)
    assert torch.equal(own, _encoded(tiny_ref, str(text))) and len(own) != len(builtin)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2
    _no_tokenizer(monkeypatch)
    assert torch.equal(models.eval_token_ids(tiny_ref, 8192, str(text), cache_dir=tmp_path), own)


def test_a_cache_that_cannot_be_written_costs_the_encoding_not_the_ids(tiny_ref, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory would be")
    ids = models.eval_token_ids(tiny_ref, 8192, cache_dir=blocked)
    assert torch.equal(ids, _encoded(tiny_ref))


def test_a_model_without_tokenizer_says_so_before_reading_anything(tiny_ref, tmp_path):
    from optimize.errors import NotApplicable

    with pytest.raises(NotApplicable, match="has no tokenizer"):
        models.eval_token_ids(dataclasses.replace(tiny_ref, tokenizer=None), 8192, cache_dir=tmp_path)
    assert not (tmp_path / "tokens").exists()


def test_prompts_from_the_text_come_from_the_cache_they_are_given(tiny_ref, tmp_path, monkeypatch):
    from bench.prompts import prompt_ids

    ids, source = prompt_ids(tiny_ref, 8192, 2, 32, seed=3, cache_dir=tmp_path)
    assert source == "eval-text" and len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    _no_tokenizer(monkeypatch)
    again, _ = prompt_ids(tiny_ref, 8192, 2, 32, seed=3, cache_dir=tmp_path)
    assert torch.equal(ids, again)
