"""Deterministic corpus of CPython standard-library source, split by file.

The split is a stable hash of each file's path relative to the stdlib root, so the same
file always lands on the same side whatever else the interpreter ships.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from optimize.errors import InputError

# Directories that are not Python source worth learning from, or not part of CPython.
EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test"})
MAX_FILE_BYTES = 400_000  # a few generated tables are huge and repetitive
# Held-out files from these directories stay out of the evaluation text: they are generated
# tables (codec maps, pydoc topics) whose siblings in training make them trivially easy,
# which would flatter perplexity and hide drift.
EVAL_EXCLUDED_DIRS = frozenset({"encodings", "pydoc_data"})
FILE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CorpusConfig:
    """How the stdlib is read and split."""

    root: str = ""  # empty means the running interpreter's stdlib
    eval_fraction: float = 0.05  # share of files held out, by path hash
    eval_text_bytes: int = 320_000  # size cap of the frozen evaluation text
    version: int = 2


@dataclass
class Corpus:
    """Train and held-out texts plus the manifest that identifies them."""

    train_text: str
    eval_text: str
    manifest: dict = field(default_factory=dict)


def stdlib_root(config: CorpusConfig) -> Path:
    return Path(config.root or sysconfig.get_paths()["stdlib"]).resolve()


def is_held_out(relative_path: str, eval_fraction: float) -> bool:
    """Stable split: the first 8 bytes of sha256(path) as a fraction of 2**64."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _eval_candidate(relative_path: str) -> bool:
    """Hand-written library code: no tests, no generated tables."""
    parts = relative_path.split("/")
    is_test = parts[0] == "test" or "tests" in parts or parts[-1].startswith("test_")
    return not is_test and parts[0] not in EVAL_EXCLUDED_DIRS


def list_files(root: Path) -> list[tuple[str, Path]]:
    """All readable ``*.py`` files under ``root``, sorted by relative path."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if EXCLUDED_PARTS.intersection(rel.split("/")):
            continue
        if path.is_symlink() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append((rel, path))
    return files


def build_corpus(config: CorpusConfig = CorpusConfig()) -> Corpus:
    """Read the stdlib and split it into training text and a frozen evaluation text.

    Raises:
        InputError: the root is not a directory or holds no ``*.py`` file.

    """
    root = stdlib_root(config)
    if not root.is_dir():
        raise InputError(f"--stdlib-root {config.root or root}: not a directory")
    files = list_files(root)
    if not files:
        raise InputError(f"--stdlib-root {config.root or root}: no *.py file under it to build the corpus from")
    train_parts: list[str] = []
    eval_parts: list[str] = []
    eval_bytes = 0
    listing = []
    for rel, path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        held_out = is_held_out(rel, config.eval_fraction)
        listing.append({"path": rel, "bytes": len(text.encode()), "split": "eval" if held_out else "train"})
        if not held_out:
            train_parts.append(text)
        elif _eval_candidate(rel) and eval_bytes + len(text) <= config.eval_text_bytes:
            # Evaluation text is library code only: whole files, in path order.
            eval_parts.append(text)
            eval_bytes += len(text)
    train_text = FILE_SEPARATOR.join(train_parts)
    eval_text = FILE_SEPARATOR.join(eval_parts)
    manifest = {
        "python_version": platform.python_version(),
        "stdlib_root": str(root),
        "config": {"eval_fraction": config.eval_fraction, "eval_text_bytes": config.eval_text_bytes},
        "files": listing,
        "train_files": sum(1 for f in listing if f["split"] == "train"),
        "eval_files": sum(1 for f in listing if f["split"] == "eval"),
        "train_bytes": len(train_text.encode()),
        "eval_text_bytes": len(eval_text.encode()),
        "train_sha256": hashlib.sha256(train_text.encode()).hexdigest(),
        "eval_sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
    }
    return Corpus(train_text=train_text, eval_text=eval_text, manifest=manifest)


def write_manifest(corpus: Corpus, path: Path) -> None:
    path.write_text(json.dumps(corpus.manifest, indent=1) + "\n")
