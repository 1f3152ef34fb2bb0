"""The evaluation text is encoded once per text, tokenizer and library versions, then read back."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

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


class _Plant:
    """Pickled into a planted entry: loading that pickle would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_planted_pickle_in_the_cache_is_never_loaded(tiny_ref, tmp_path):
    """The cache holds plain int64 arrays: an entry that needs unpickling is encoded again, its code never run."""
    expected = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    [entry] = (tmp_path / "tokens").glob("*.npy")
    marker = tmp_path / "the-pickle-ran"
    with entry.open("wb") as f:
        np.save(f, np.array([_Plant(marker)], dtype=object), allow_pickle=True)
    assert torch.equal(models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path), expected)
    assert not marker.exists()
    assert np.array_equal(np.load(entry), expected.numpy())


def test_an_entry_is_returned_as_stored_token_id_zero_included(tiny_ref, tmp_path, monkeypatch):
    models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    [entry] = (tmp_path / "tokens").glob("*.npy")
    stored = np.array([0, 5, 0, 8191, 3], dtype=np.int64)  # 0 is a token id like any other
    with entry.open("wb") as f:
        np.save(f, stored)
    _no_tokenizer(monkeypatch)
    assert models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path).tolist() == stored.tolist()


def test_a_cache_directory_that_does_not_exist_yet_is_made(tiny_ref, tmp_path):
    cache = tmp_path / "not" / "made" / "yet"
    ids = models.eval_token_ids(tiny_ref, 8192, cache_dir=cache)
    [entry] = (cache / "tokens").glob("*.npy")
    assert np.array_equal(np.load(entry), ids.numpy())


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model.onnx", "model.onnx_data",
                                     "consolidated.pt"])
def test_weight_files_beside_the_tokenizer_leave_the_key_alone(tiny_ref, tmp_path, weights):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_ref.tokenizer, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    before = models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache")
    (tok_dir / weights).write_bytes(b"\x00" * 64)
    assert models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache") == before
    (tok_dir / "added_tokens.json").write_text("{}")  # any other file is part of the tokenizer
    assert models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache") != before


def test_trust_remote_code_is_off_by_default_and_keeps_its_own_entry(tiny_ref, tmp_path, monkeypatch):
    loads = []
    real = models.load_tokenizer

    def recording(ref, trust_remote_code=False):
        loads.append(trust_remote_code)
        return real(ref, trust_remote_code)

    monkeypatch.setattr(models, "load_tokenizer", recording)
    default = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)
    assert models.eval_token_ids(tiny_ref, 8192, trust_remote_code=False, cache_dir=tmp_path).tolist() == \
        default.tolist()
    assert loads == [False]  # the untrusted call read what the default one stored
    # A trusted tokenizer may run its own code, so its ids are its own entry, encoded with trust
    assert torch.equal(models.eval_token_ids(tiny_ref, 8192, trust_remote_code=True, cache_dir=tmp_path), default)
    assert loads == [False, True]
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2


def test_the_text_is_encoded_without_the_tokenizers_special_tokens(bos_ref, tmp_path):
    """A tokenizer that puts BOS before every text it encodes: the evaluation text's ids carry none."""
    tok = models.load_tokenizer(bos_ref)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds one when asked
    ids = models.eval_token_ids(bos_ref, 8192, cache_dir=tmp_path)
    assert torch.equal(ids, _encoded(bos_ref)) and int(ids[0]) != tok.bos_token_id


def test_encoding_the_evaluation_text_warns_of_no_sequence_length(tiny_ref, tmp_path):
    """The text is longer than the tokenizer's model_max_length by design: it is cut into windows."""
    import logging

    from transformers.utils import logging as hf_logging

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        ids = models.eval_token_ids(tiny_ref, 8192, cache_dir=tmp_path)  # an empty cache: the text is encoded here
    finally:
        hf_logger.removeHandler(handler)
    assert len(ids) > models.load_tokenizer(tiny_ref).model_max_length  # the case transformers warns of
    assert [r.getMessage() for r in seen] == []


def test_a_tokenizer_directory_that_is_gone_fails_loading_it_and_writes_no_entry(tiny_ref, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(tiny_ref.tokenizer, gone)
    ref = dataclasses.replace(tiny_ref, tokenizer=str(gone))
    shutil.rmtree(gone)
    with pytest.raises((OSError, ValueError)) as raised:  # transformers' own error for a tokenizer it cannot find
        models.eval_token_ids(ref, 8192, cache_dir=tmp_path / "cache")
    assert "gone" in str(raised.value)
    assert not (tmp_path / "cache" / "tokens").exists()


def test_the_text_is_read_as_utf8_whatever_the_locale(tiny_ref, tmp_path):
    """A user's text with non-ASCII characters gives the same ids under an ASCII locale as here."""
    import json
    import os
    import subprocess
    import sys

    text = tmp_path / "eval.txt"
    text.write_text("def café(naïve):\n    return 'ünïcode ✓'\n" * 50, encoding="utf-8")
    here = models.eval_token_ids(tiny_ref, 8192, str(text), cache_dir=tmp_path / "here")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    code = ("import json, locale, sys; from optimize import models; "
            "ids = models.eval_token_ids(models.resolve_model('synthetic:llama-tiny'), 8192, sys.argv[1], "
            "cache_dir=sys.argv[2]); print(json.dumps([locale.getpreferredencoding(False), ids.tolist()]))")
    root = Path(__file__).resolve().parents[2]  # where `optimize` is imported from
    proc = subprocess.run([sys.executable, "-c", code, str(text), str(tmp_path / "ascii-locale")], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    encoding, ids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert encoding.lower() in {"ansi_x3.4-1968", "ascii", "us-ascii"}  # the locale really is not UTF-8
    assert ids == here.tolist()


def test_a_large_file_beside_the_tokenizer_counts_by_its_size_head_and_tail(tiny_ref, tmp_path):
    """Another framework's weights (tf_model.h5, flax_model.msgpack) are not read whole for every cell."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_ref.tokenizer, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    big = tok_dir / "tf_model.h5"
    size = models._TOKENIZER_FILE_MAX_BYTES + 4096
    with big.open("wb") as f:
        f.truncate(size)

    def key():
        return models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache")

    def poke(offset: int) -> None:
        with big.open("r+b") as f:
            f.seek(offset)
            f.write(b"\x01")

    base = key()
    poke(size // 2)  # the middle is not read
    assert key() == base
    poke(size - 1)  # the tail is
    assert key() != base
    tail = key()
    poke(10)  # and the head
    assert key() != tail


def test_a_file_of_exactly_the_limit_is_hashed_whole(tiny_ref, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_ref.tokenizer, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    big = tok_dir / "tokenizer.model"
    with big.open("wb") as f:
        f.truncate(models._TOKENIZER_FILE_MAX_BYTES)
    base = models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache")
    with big.open("r+b") as f:
        f.seek(models._TOKENIZER_FILE_MAX_BYTES // 2)
        f.write(b"\x01")
    assert models._token_cache_path(tok_dir, b"text", False, tmp_path / "cache") != base
