"""The variant store never serves a corrupted artifact, and leaves no temporary directories behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optimize.registry import builtin_variant
from optimize.store import MANIFEST, VariantStore

# Names added with the integrity checks are imported inside the tests that use them, so that
# without them each test fails on its own rather than the whole file failing to import.


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path, tiny_ref):
    """A store of its own, so corrupting an artifact cannot disturb other tests."""
    return VariantStore(tmp_path)


def test_manifest_lists_the_size_and_sha256_of_every_file(store, tiny_ref):
    art = store.get_or_build(tiny_ref, builtin_variant("prune-50"), "cpu")
    files = art.manifest["files"]
    on_disk = {p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(files) == on_disk and "model.safetensors" in files
    import hashlib

    weights = art.path / "model.safetensors"
    assert files["model.safetensors"] == {"bytes": weights.stat().st_size,
                                          "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def _corrupt(path, offset: int = 4096, size: int = 1 << 16) -> None:
    """Random bytes over part of the file, its size unchanged (bit rot, a bad copy)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(os.urandom(size))


def test_corrupted_artifact_is_rebuilt_with_a_warning_not_reused(store, tiny_ref):
    from optimize.store import StoreIntegrityWarning, verify_artifact

    recipe = builtin_variant("prune-50")
    first = store.get_or_build(tiny_ref, recipe, "cpu")
    good = first.manifest["files"]["model.safetensors"]["sha256"]
    _corrupt(first.path / "model.safetensors")
    with pytest.warns(StoreIntegrityWarning, match="model.safetensors does not match its sha256"):
        again = store.get_or_build(tiny_ref, recipe, "cpu")
    assert not again.reused and again.path == first.path
    assert again.manifest["files"]["model.safetensors"]["sha256"] == good  # deterministic rebuild
    assert verify_artifact(again.path, again.manifest) is None


def test_truncated_artifact_is_rebuilt_not_failed_forever(store, tiny_ref):
    from optimize.store import StoreIntegrityWarning

    recipe = builtin_variant("prune-50")
    first = store.get_or_build(tiny_ref, recipe, "cpu")
    weights = first.path / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.warns(StoreIntegrityWarning, match="bytes, the manifest says"):
        again = store.get_or_build(tiny_ref, recipe, "cpu")
    assert not again.reused
    assert store.get_or_build(tiny_ref, recipe, "cpu").reused  # and the rebuilt one is reused after


def test_corrupted_onnx_artifact_is_rebuilt(store, tiny_ref):
    from optimize.store import StoreIntegrityWarning, verify_artifact

    pytest.importorskip("onnxruntime", reason="the ONNX variants need onnxruntime")
    recipe = builtin_variant("onnx-int8-dynamic")
    first = store.get_or_build(tiny_ref, recipe, "cpu")
    [onnx] = [p for p in first.path.rglob("*.onnx")]
    _corrupt(onnx)
    with pytest.warns(StoreIntegrityWarning):
        again = store.get_or_build(tiny_ref, recipe, "cpu")
    assert not again.reused and verify_artifact(again.path, again.manifest) is None


def test_artifact_without_checksums_is_rebuilt(store, tiny_ref):
    from optimize.store import StoreIntegrityWarning

    recipe = builtin_variant("prune-50")
    art = store.get_or_build(tiny_ref, recipe, "cpu")
    manifest = json.loads((art.path / MANIFEST).read_text())
    del manifest["files"]  # as written by an older version
    (art.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(StoreIntegrityWarning, match="no file checksums"):
        assert not store.get_or_build(tiny_ref, recipe, "cpu").reused


def test_hash_is_checked_again_when_a_files_mtime_changes(store, tiny_ref):
    from optimize.store import verify_artifact

    art = store.get_or_build(tiny_ref, builtin_variant("prune-50"), "cpu")
    weights = art.path / "model.safetensors"
    assert verify_artifact(art.path, art.manifest) is None
    _corrupt(weights)  # a write moves the mtime, so this process hashes the file again
    assert "sha256" in verify_artifact(art.path, art.manifest)


def test_orchestrator_does_not_count_a_corrupted_artifact_as_stored(tmp_path, tiny_ref):
    from bench.orchestrate import _already_stored
    from optimize.store import StoreIntegrityWarning

    store = VariantStore(tmp_path)
    recipe = builtin_variant("prune-50")
    art = store.get_or_build(tiny_ref, recipe, "cpu")
    job = {"model": "synthetic:llama-tiny", "variant": recipe.to_dict(), "device": "cpu"}
    # the tiny model lives in the session cache; point this store's models at it
    shutil.copytree(os.path.dirname(tiny_ref.path), tmp_path / "models", dirs_exist_ok=True)
    assert "b" in _already_stored({"b": job}, {}, str(tmp_path))
    _corrupt(art.path / "model.safetensors")
    with pytest.warns(StoreIntegrityWarning):
        assert _already_stored({"b": job}, {}, str(tmp_path)) == {}


def test_content_hash_follows_contents_not_the_directory_name(store, tiny_ref, tmp_path):
    from optimize.store import content_hash

    art = store.get_or_build(tiny_ref, builtin_variant("prune-50"), "cpu")
    copy = tmp_path / "elsewhere" / art.path.name
    shutil.copytree(art.path, copy)
    assert content_hash(copy) == art.content_hash
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64  # what a rebuilt, different artifact lists
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert content_hash(copy) != art.content_hash
    assert content_hash(tiny_ref.path) != content_hash(art.path)  # a plain model directory: its fingerprint


def test_drift_cache_key_changes_when_the_artifact_content_changes(store, tiny_ref, tmp_path):
    from bench.cells import Cell
    from bench.metrics.drift_cell import _variant_key
    from bench.metrics.drift_config import DriftConfig
    from bench.scenarios import GenerateScenario

    art = store.get_or_build(tiny_ref, builtin_variant("prune-50"), "cpu")
    cell = Cell(model="m", recipe=builtin_variant("prune-50"), device="cpu", scenario=GenerateScenario(),
                drift=DriftConfig())
    key = _variant_key(tmp_path / "ref", cell, art.path, 8)
    manifest = json.loads((art.path / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "f" * 64
    (art.path / MANIFEST).write_text(json.dumps(manifest))
    assert _variant_key(tmp_path / "ref", cell, art.path, 8) != key  # same directory name, other content


def test_temporary_build_directories_of_dead_builders_are_swept_on_start(tmp_path):
    variants = tmp_path / "variants"
    dead = variants / f"abc.tmp{_dead_pid()}"
    live = variants / f"def.tmp{os.getppid()}"
    mine = variants / f"ghi.tmp{os.getpid()}"
    for d in (dead, live, mine):
        (d / "sub").mkdir(parents=True)
    VariantStore(tmp_path)
    assert not dead.exists() and live.exists() and mine.exists()


def test_failed_build_leaves_no_temporary_directory(store, tiny_ref, monkeypatch):
    from optimize.recipe import Recipe

    def boom(*a, **k):
        raise RuntimeError("build crashed")

    monkeypatch.setattr(VariantStore, "_build", boom)
    with pytest.raises(RuntimeError):
        store.get_or_build(tiny_ref, Recipe(name="p", steps=builtin_variant("prune-50").steps), "cpu")
    assert not list(store.root.glob("*.tmp*"))


def test_racing_synthetic_materialisation_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from optimize.models import SYNTHETIC, _materialise_synthetic, _synthetic_dir

    arch = SYNTHETIC["llama-tiny"]
    out = _synthetic_dir("llama-tiny", arch, tmp_path)
    real_save = LlamaForCausalLM.save_pretrained

    def save_while_another_process_finishes(self, path, **kw):
        real_save(self, path, **kw)
        shutil.copytree(path, out)  # the other materialisation renamed its copy into place first

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_while_another_process_finishes)
    assert _materialise_synthetic("llama-tiny", arch, tmp_path) == out
    assert (out / "config.json").exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_stale_synthetic_model_tmp_dirs_are_swept(tmp_path):
    from optimize.atomic import sweep_stale_tmp
    from optimize.models import SYNTHETIC, _materialise_synthetic, _synthetic_dir

    out = _synthetic_dir("llama-tiny", SYNTHETIC["llama-tiny"], tmp_path)
    stale = out.with_name(f"{out.name}.tmp{_dead_pid()}")
    stale.mkdir(parents=True)
    _materialise_synthetic("llama-tiny", SYNTHETIC["llama-tiny"], tmp_path)
    assert not stale.exists()
    assert sweep_stale_tmp(out.parent) == []


def test_sweep_leaves_build_directories_of_other_machines_alone(tmp_path):
    from optimize.atomic import sweep_stale_tmp, tmp_sibling

    dead = _dead_pid()
    other = tmp_path / f"abc.tmp{dead}@another-host"
    here = tmp_sibling(tmp_path / "def").with_name(f"def.tmp{dead}@{tmp_sibling(tmp_path).name.split('@')[1]}")
    for d in (other, here):
        d.mkdir()
    with pytest.warns(UserWarning, match="removed 1 temporary entry"):
        assert sweep_stale_tmp(tmp_path) == [here]
    assert other.exists()


def test_a_sweep_of_one_entry_leaves_the_other_temporaries_of_its_folder(tmp_path):
    from optimize.atomic import sweep_stale_tmp

    dead = _dead_pid()
    mine, similar, other = (tmp_path / f"{name}.tmp{dead}" for name in ("model", "model.tmp1", "notes"))
    for d in (mine, similar, other):
        d.mkdir()
    with pytest.warns(UserWarning, match="removed 1 temporary entry"):
        assert sweep_stale_tmp(tmp_path, of="model") == [mine]
    assert similar.exists() and other.exists()
    assert sweep_stale_tmp(tmp_path, of="absent") == []


@pytest.mark.parametrize("data", ['{"a": 1}', b"\x00\x01 bytes"])
def test_write_atomic_writes_through_this_hosts_tagged_temporary_and_cleans_up_on_failure(tmp_path, monkeypatch, data):
    import socket

    from optimize import atomic

    path = tmp_path / "x.json"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_atomic(path, data)
    assert (path.read_bytes() if isinstance(data, bytes) else path.read_text()) == data
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())
    assert seen == [f"x.json.tmp{os.getpid()}@{host}"]  # sweepable, and only by this machine

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(path, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert path.read_bytes() == (data if isinstance(data, bytes) else data.encode())  # the old content, whole
