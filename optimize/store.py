"""Content-addressed variant store.

An artifact is keyed by sha256(model fingerprint, the recipe's saved steps, device,
versions of the libraries that produce it). It is built in a temporary directory and
renamed into place, so a crashed build never leaves a half artifact, and concurrent
builders (Ray tasks) end with one copy. Only safetensors and ONNX files are written.

The manifest lists every file's size and sha256. A reused artifact is verified: sizes
every time, hashes once per process (and again when a file's mtime changes); a wrong or
unverifiable one is rebuilt with a warning, never served. Caches derived from an
artifact key on ``content_hash``, never on its directory name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from optimize.atomic import build_dir_atomically, sweep_stale_tmp, tmp_sibling
from optimize.errors import NotApplicable
from optimize.libraries import libraries
from optimize.models import ModelRef, default_cache_dir
from optimize.recipe import Recipe
from optimize.state import VariantState

MANIFEST = "manifest.json"
KEY_LIBRARIES = libraries("artifact")


def library_versions(names=KEY_LIBRARIES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class StoreIntegrityWarning(UserWarning):
    """A stored artifact did not match its manifest; it is rebuilt."""


_HASHED: dict[str, tuple[int, int]] = {}  # file -> (size, mtime_ns) whose sha256 this process checked


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": digest}}`` of every file under ``root`` but the manifest."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel = f.relative_to(root).as_posix()
            out[rel] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            st = f.stat()
            _HASHED[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def verify_artifact(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why the artifact at ``path`` does not match ``manifest``, or None when it does."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no file checksums (built by an older version)"
    for rel, want in sorted(files.items()):
        f = path / rel
        try:
            st = f.stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != want.get("bytes"):
            return f"{rel} has {st.st_size} bytes, the manifest says {want.get('bytes')}"
        if _HASHED.get(str(f)) == (st.st_size, st.st_mtime_ns):
            continue  # hashed by this process already, unchanged since
        if _sha256(f) != want.get("sha256"):
            return f"{rel} does not match its sha256 in the manifest (corrupted or modified)"
        _HASHED[str(f)] = (st.st_size, st.st_mtime_ns)
    return None


def content_hash(path: Path) -> str:
    """Identity of a model directory's contents, for keying caches derived from it.

    A store artifact: sha256 over its manifest's file checksums (so a rebuilt or corrupted
    artifact never shares a key with the intact one). Any other directory (a reference
    model): the model fingerprint over its config and weight files.
    """
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text()).get("files")
    except (OSError, ValueError):
        files = None
    if isinstance(files, dict) and files:
        payload = {rel: f.get("sha256") for rel, f in files.items()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    from optimize.models import _dir_fingerprint

    return _dir_fingerprint(path)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


@dataclass(frozen=True)
class Artifact:
    """A stored build: the directory the runtime loads and its manifest."""

    path: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def content_hash(self) -> str:
        """Identity of the artifact's contents (see ``content_hash``)."""
        return content_hash(self.path)


class VariantStore:
    """Builds the saved part of a recipe once, then hands out the stored artifact."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or default_cache_dir()) / "variants"
        sweep_stale_tmp(self.root)  # builds killed by a timeout or a crash left these

    def key(self, ref: ModelRef, recipe: Recipe, device: str) -> str:
        payload = {
            "model": ref.fingerprint,
            "steps": recipe.content_hash(recipe.saved_steps),
            "device": device,
            "versions": library_versions(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def get_or_build(self, ref: ModelRef, recipe: Recipe, device: str, trust_remote_code: bool = False) -> Artifact:
        """The artifact for ``recipe``'s saved steps; the reference directory when there are none."""
        if not recipe.saved_steps:
            return Artifact(Path(ref.path), {"recipe": recipe.to_dict(), "saved_steps": []}, reused=True)
        final = self.root / self.key(ref, recipe, device)
        manifest = self.stored(final)
        if manifest is not None:
            return Artifact(final, manifest, reused=True)

        def fill(tmp: Path) -> None:
            manifest = self._build(ref, recipe, device, tmp, trust_remote_code)
            manifest["files"] = file_digests(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")

        build_dir_atomically(final, fill)
        return Artifact(final, json.loads((final / MANIFEST).read_text()), reused=False)

    def stored(self, final: Path) -> dict[str, Any] | None:
        """The manifest of the verified artifact at ``final``; None when absent or removed as wrong."""
        if not (final / MANIFEST).exists():
            return None
        manifest = _read_manifest(final)
        why = "its manifest is unreadable" if manifest is None else verify_artifact(final, manifest)
        if why is None:
            return manifest
        warnings.warn(f"stored artifact {final.name} is not what was built ({why}); rebuilding it",
                      StoreIntegrityWarning, stacklevel=2)
        aside = tmp_sibling(final.with_name(f"{final.name}.bad"))
        try:
            final.rename(aside)  # out of the way at once; a concurrent builder then builds afresh
        except OSError:
            return None  # another process moved or rebuilt it first
        shutil.rmtree(aside, ignore_errors=True)
        return None

    def _build(self, ref: ModelRef, recipe: Recipe, device: str, out: Path, trust_remote_code: bool) -> dict:
        t0 = time.perf_counter()
        state = VariantState(ref=ref, device=device, source_dir=Path(ref.path), work_dir=out,
                             trust_remote_code=trust_remote_code)
        reference_params, steps, prefix = None, recipe.saved_steps, None
        if len(steps) > 1 and steps[-1].stage == "graph":
            # Graph steps transform an exported model: start from the stored prefix artifact
            # (one export serves fp32, dynamic int8 and static int8) instead of exporting again.
            prefix = self.get_or_build(ref, Recipe(name=f"{recipe.name}:prefix", steps=steps[:-1]), device,
                                       trust_remote_code)
            for f in prefix.path.iterdir():
                if f.name != MANIFEST:
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
            state.backend, state.onnx_dir = prefix.manifest["backend"], out
            state.reports, state.labels = list(prefix.manifest["reports"]), list(prefix.manifest["labels"])
            reference_params, steps = prefix.manifest.get("reference_parameters"), steps[-1:]
        for step in steps:
            if step.stage == "weights" and reference_params is None:
                reference_params = sum(p.numel() for p in state.model.parameters())
            if step.stage == "export" and state.loaded:
                # Later stages read weights from disk: save what the weight steps produced.
                weights_dir = out / "weights"
                state.model.save_pretrained(str(weights_dir), safe_serialization=True)
                _copy_tokenizer(Path(ref.path), weights_dir)
                state.source_dir, state.model = weights_dir, None
            state.reports.append({"technique": step.technique, **(_apply(step, state) or {})})
        facts: dict[str, Any] = {}
        if state.backend == "torch":
            params = sum(p.numel() for p in state.model.parameters())
            state.model.save_pretrained(str(out), safe_serialization=True)
            _copy_tokenizer(Path(ref.path), out)
        else:
            from optimize.export.onnx import embedding_facts

            params, facts = None, embedding_facts(out)  # the cells' bandwidth figure, without parsing the graph
        return {
            **facts,
            "recipe": recipe.to_dict(),
            "saved_steps": [s.to_dict() for s in recipe.saved_steps],
            "model": ref.to_dict(),
            "device": device,
            "backend": state.backend,
            "reports": state.reports,
            "labels": state.labels,
            "parameters": params,
            "reference_parameters": reference_params,
            "artifact_bytes": dir_bytes(out),
            "built_from_prefix": str(prefix.path) if prefix else None,
            "build_s": round(time.perf_counter() - t0, 3),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _apply(step, state: VariantState) -> dict | None:
    if step.backend not in ("any", state.backend):
        raise NotApplicable(f"{step.technique} needs the {step.backend} backend, the recipe has {state.backend} here")
    return step.apply(state)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def load_variant(ref: ModelRef, recipe: Recipe, device: str, store: VariantStore,
                 trust_remote_code: bool = False) -> tuple[VariantState, Artifact]:
    """Build (or reuse) the saved part of ``recipe`` and apply its runtime steps on ``device``."""
    artifact = store.get_or_build(ref, recipe, device, trust_remote_code)
    # The saved steps' reports come from the artifact's manifest (they ran when it was built); runtime steps add theirs.
    state = VariantState(ref=ref, device=device, source_dir=artifact.path, trust_remote_code=trust_remote_code,
                         labels=list(artifact.manifest.get("labels", [])),
                         reports=[dict(r) for r in artifact.manifest.get("reports", [])])
    if recipe.backend == "onnxruntime":
        from optimize.export.onnx import load_ort_model, ort_label

        export = next(s for s in recipe.steps if s.stage == "export")
        state.backend, state.onnx_dir = "onnxruntime", artifact.path
        state.model = load_ort_model(artifact.path, device, export)
        state.labels.append(ort_label(state.model))
    for step in recipe.runtime_steps:
        state.reports.append({"technique": step.technique, **(_apply(step, state) or {})})
    state.model  # noqa: B018 - load now, so load time is not charged to the first measurement
    return state, artifact
