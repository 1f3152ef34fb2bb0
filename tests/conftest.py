"""Shared fixtures: an isolated cache for the variant store and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

COLLECTED = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Keep every collected test, before ``-m`` and ``-k`` deselect any (tests/test_gpu_check.py reads them)."""
    config.stash[COLLECTED] = list(items)


@pytest.fixture
def cuda_only():
    """Skip the test where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's own store; exported so CLI subprocesses and cell processes use it too."""
    path = tmp_path_factory.mktemp("infermatrix-cache")
    os.environ["INFERMATRIX_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ref(cache_dir):
    """The tiny synthetic Llama (hidden 128, 2 layers, GQA 4/2 heads, FFN 256, vocab 8192)."""
    from optimize.models import resolve_model

    return resolve_model("synthetic:llama-tiny", cache_dir)


@pytest.fixture(scope="session")
def bos_ref(tiny_ref, tmp_path_factory):
    """The tiny model with a copy of its tokenizer that puts BOS before every text it encodes."""
    import shutil
    from dataclasses import replace

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    source = Path(tiny_ref.tokenizer)
    directory = tmp_path_factory.mktemp("bos-tokenizer")
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
            shutil.copy(f, directory / f.name)
    tok = AutoTokenizer.from_pretrained(str(directory))
    assert tok.bos_token_id is not None
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(str(directory))
    return replace(tiny_ref, tokenizer=str(directory))


@pytest.fixture
def tiny_prompts(tiny_ref):
    """(2, 16) prompt ids from the evaluation text."""
    from bench.prompts import prompt_ids

    ids, source = prompt_ids(tiny_ref, 8192, batch_size=2, prompt_tokens=16)
    assert source == "eval-text"
    return ids


def kernel_refuses_peak_reset() -> str | None:
    """Why this kernel refuses a peak-RSS reset, or None; asked of the kernel directly, so that a
    broken ``memory.reset_peak_rss`` cannot excuse the tests that judge it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as exc:
        return f"this kernel refuses /proc/self/clear_refs: {exc}"
    return None


@pytest.fixture
def peak_rss_resets() -> None:
    """Skip where the kernel refuses a peak-RSS reset."""
    refused = kernel_refuses_peak_reset()
    if refused:
        pytest.skip(refused)
