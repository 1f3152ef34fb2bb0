"""Reference models: the built-in trained model, synthetic architectures, or any HF causal LM.

Model specs:
- ``builtin:pycode``: the trained reference model shipped in the package;
- ``synthetic:NAME``: an architecture from ``SYNTHETIC`` (Llama, GPT-2, OPT, GPT-NeoX, Qwen2,
  Mistral, Phi) with random weights (fixed seed), for speed-only runs and the architecture
  tests; saved once to the cache so other tools can load it; its prompts come from the
  built-in tokenizer, whose 8192 ids every synthetic vocabulary holds;
- anything else: a local model directory or a hub id, loaded with ``from_pretrained``
  (offline when ``HF_HUB_OFFLINE=1``; ``trust_remote_code`` only when asked).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from optimize.errors import InputError, NotApplicable, exception_line
from optimize.reference import BUILTIN_DIR, EVAL_TEXT

BUILTIN_MODELS = {"pycode": BUILTIN_DIR}


FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "qwen2", "mistral", "phi")


@dataclass(frozen=True)
class SyntheticArch:
    """A decoder architecture of one Hugging Face family, with random weights."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    num_kv_heads: int = 0  # 0: same as num_heads (no GQA); families without GQA ignore it
    max_position_embeddings: int = 2048
    seed: int = 0
    family: str = "llama"  # one of FAMILIES
    tie_word_embeddings: bool = False  # GPT-2 and OPT always tie theirs


def _tiny(family: str, **kw) -> SyntheticArch:
    """Tiny test models: widths multiples of 64 so every technique's shape rules hold (NF4, 2:4, prune-ffn)."""
    return SyntheticArch(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=8192,
                         max_position_embeddings=512, family=family, **kw)


SYNTHETIC = {
    # For tests: every technique applies (widths multiples of 64, GQA, NF4-friendly shapes).
    "llama-tiny": SyntheticArch(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                vocab_size=8192, max_position_embeddings=512),
    "llama-134m": SyntheticArch(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048),
    "llama-1b": SyntheticArch(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
    # The architecture matrix: one tiny model per family the harness is tested on.
    "llama-tied-tiny": _tiny("llama", tie_word_embeddings=True),
    "gpt2-tiny": _tiny("gpt2"),
    "opt-tiny": _tiny("opt"),
    "gpt-neox-tiny": _tiny("gpt_neox"),
    "qwen2-tiny": _tiny("qwen2", num_kv_heads=2),
    "mistral-tiny": _tiny("mistral", num_kv_heads=2),
    "phi-tiny": _tiny("phi"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("INFERMATRIX_CACHE") or Path.home() / ".cache" / "infermatrix")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: where its HF directory is and what identifies its weights."""

    spec: str
    kind: str  # "builtin" | "synthetic" | "pretrained"
    path: str  # HF model directory (synthetic ones are materialised in the cache)
    fingerprint: str
    has_tokenizer: bool  # the model directory holds its own tokenizer
    trained: bool  # False for random weights: drift figures are not meaningful
    tokenizer: str | None = None  # directory of the tokenizer text is encoded with; None: prompts are random ids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_weights(f: Path) -> bool:
    return f.suffix in {".safetensors", ".bin", ".onnx", ".pt"} or f.name.endswith(".onnx_data")


def _dir_fingerprint(path: Path) -> str:
    """sha256 over config.json and each weight file's name, size, head and tail.

    Hashing head and tail (1 MiB each) keeps multi-GB checkpoints cheap to identify while
    any retraining or re-quantization changes the digest.
    """
    h = hashlib.sha256()
    config = path / "config.json"
    h.update(config.read_bytes() if config.exists() else b"")
    for f in sorted(path.iterdir()):
        if _is_weights(f):
            _hash_head_and_tail(h, f)
    return h.hexdigest()[:16]


def _hash_head_and_tail(h, f: Path) -> None:
    """Feed ``h`` the file's name, size, first MiB and (past 2 MiB) last MiB."""
    size = f.stat().st_size
    h.update(f"{f.name}:{size}".encode())
    with f.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())


def synthetic_config(arch: SyntheticArch):
    """The transformers config of ``arch``'s family (ids 1/2/0 for BOS/EOS/PAD, as the built-in tokenizer)."""
    import transformers

    common = dict(vocab_size=arch.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    h, layers, heads, ffn = arch.hidden_size, arch.num_layers, arch.num_heads, arch.intermediate_size
    kv_heads, positions = arch.num_kv_heads or heads, arch.max_position_embeddings
    if arch.family == "gpt2":
        return transformers.GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions,
                                       **common)
    if arch.family == "opt":
        return transformers.OPTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                                      word_embed_proj_dim=h, max_position_embeddings=positions, **common)
    if arch.family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=ffn, max_position_embeddings=positions,
                                          tie_word_embeddings=arch.tie_word_embeddings, **common)
    if arch.family == "phi":
        return transformers.PhiConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=ffn, max_position_embeddings=positions,
                                      tie_word_embeddings=arch.tie_word_embeddings, **common)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch.family]
    return cls(hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, max_position_embeddings=positions,
               tie_word_embeddings=arch.tie_word_embeddings, **common)


def _synthetic_dir(name: str, arch: SyntheticArch, cache: Path) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(arch), sort_keys=True).encode()).hexdigest()[:16]
    return cache / "models" / f"synthetic-{name}-{digest}"


def _materialise_synthetic(name: str, arch: SyntheticArch, cache: Path) -> Path:
    """Save the random-weight model once, so every variant and tool loads the same weights."""
    out = _synthetic_dir(name, arch, cache)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from optimize.atomic import build_dir_atomically, sweep_stale_tmp

    sweep_stale_tmp(out.parent)
    torch.manual_seed(arch.seed)
    model = AutoModelForCausalLM.from_config(synthetic_config(arch))
    # A racing materialisation keeps the first copy and removes ours; a failed one leaves nothing.
    build_dir_atomically(out, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    return out


def is_hub_spec(spec: str) -> bool:
    """A spec that names a Hugging Face hub model (not built-in, synthetic or a local directory)."""
    return spec.partition(":")[0] not in ("builtin", "synthetic") and not Path(spec).expanduser().is_dir()


def peek_model(spec: str, cache: Path | None = None, tokenizer: str | None = None) -> ModelRef | None:
    """The ``ModelRef`` when it can be had without loading or downloading anything, else None.

    Lets the orchestrator see that a variant or reference is already stored without
    starting a process (and importing torch) to find out.
    """
    cache = cache or default_cache_dir()
    kind, _, name = spec.partition(":")
    if kind == "synthetic" and name in SYNTHETIC:
        path = _synthetic_dir(name, SYNTHETIC[name], cache)
        return resolve_model(spec, cache, tokenizer) if (path / "config.json").exists() else None
    if kind == "builtin" or Path(spec).expanduser().is_dir():
        return resolve_model(spec, cache, tokenizer)
    return None


def check_model_spec(spec: str) -> None:
    """Reject a spec that cannot name a model, without loading anything."""
    from optimize.registry import did_you_mean

    kind, _, name = spec.partition(":")
    if kind == "builtin" and name not in BUILTIN_MODELS:
        raise InputError(f"unknown built-in model {spec!r}{did_you_mean(name, BUILTIN_MODELS)}; available: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
    if kind == "synthetic" and name not in SYNTHETIC:
        raise InputError(f"unknown synthetic model {spec!r}{did_you_mean(name, SYNTHETIC)}; available: "
                         + ", ".join(f"synthetic:{n}" for n in SYNTHETIC))
    if kind in ("builtin", "synthetic"):
        return
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise InputError(f"model directory {spec!r} does not exist or has no config.json")
    if looks_local:
        _check_model_dir(spec, path)
    if not looks_local and not _is_hub_id(spec):
        raise InputError(f"model {spec!r} is not builtin:NAME, synthetic:NAME, a local directory or a hub id "
                         "like gpt2 or org/name")


def _is_hub_id(spec: str) -> bool:
    """Whether ``spec`` can name a hub repository: ``NAME`` (root-level models such as ``gpt2``) or ``ORG/NAME``,
    by the hub library's own rules (no ``a//b``, ``--``, ``..`` or spaces).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


# Weight files transformers loads into a torch model (one file, or shards with their index).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _check_model_dir(spec: str, path: Path) -> None:
    """A local model directory's config must be a JSON object naming its type, and weights must be there."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"model directory {spec!r}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"model directory {spec!r}: config.json has no 'model_type' (a transformers config names "
                         "its architecture there)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise InputError(f"model directory {spec!r} holds no weights (model.safetensors, pytorch_model.bin or "
                         "their sharded forms)")


def has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def check_tokenizer_dir(tokenizer: str) -> str:
    """The resolved ``--tokenizer`` directory; ``InputError`` unless it holds a Hugging Face tokenizer."""
    path = Path(tokenizer).expanduser()
    if not has_tokenizer_files(path):
        raise InputError(f"--tokenizer {tokenizer!r} is not a directory with tokenizer.json or tokenizer_config.json")
    return str(path.resolve())


def resolve_model(spec: str, cache: Path | None = None, tokenizer: str | None = None) -> ModelRef:
    """Turn a model spec into a ``ModelRef``; raises ``InputError`` for unknown specs.

    Args:
        spec: ``builtin:NAME``, ``synthetic:NAME``, a local directory or a hub id.
        cache: the store's root (default ``$INFERMATRIX_CACHE``).
        tokenizer: a tokenizer directory to encode text with, in place of the model's own
            (for models saved without one).

    """
    ref = _resolve(spec, cache or default_cache_dir())
    if tokenizer:
        return replace(ref, tokenizer=check_tokenizer_dir(tokenizer))
    return ref


def _resolve(spec: str, cache: Path) -> ModelRef:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise InputError(f"unknown built-in model {spec!r}; available: " +
                             ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
        path = BUILTIN_MODELS[name]
        if not (path / "config.json").exists():
            raise InputError(f"built-in model {spec!r} is missing from {path}; reinstall the package")
        return ModelRef(spec, "builtin", str(path), _dir_fingerprint(path), True, True, str(path))
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        if name not in SYNTHETIC:
            from optimize.registry import did_you_mean

            raise InputError(f"unknown synthetic model {spec!r}{did_you_mean(name, SYNTHETIC)}; available: " +
                             ", ".join(f"synthetic:{n}" for n in SYNTHETIC))
        path = _materialise_synthetic(name, SYNTHETIC[name], cache)
        # Synthetic vocabularies hold the built-in tokenizer's 8192 ids: prompts are real text.
        return ModelRef(spec, "synthetic", str(path), _dir_fingerprint(path), False, False, str(BUILTIN_DIR))
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"model directory {spec!r} has no config.json")
        own = has_tokenizer_files(local)
        return ModelRef(spec, "pretrained", str(local.resolve()), _dir_fingerprint(local), own, True,
                        str(local.resolve()) if own else None)
    return fetch_hub_model(spec)


def fetch_hub_model(spec: str) -> ModelRef:
    """Download a hub model (or find it in the hub cache with HF_HUB_OFFLINE=1); ``InputError`` if it cannot be had.

    ``infermatrix run`` calls it before any cell starts, so an unreachable id is bad input up
    front and a large download is not charged to the first cell's timeout.
    """
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # network errors, missing repos, offline cache misses
        raise InputError(f"model {spec!r} is neither a built-in, a synthetic, a local directory nor a reachable "
                         f"hub id ({exception_line(exc)})") from None
    own = has_tokenizer_files(path)
    return ModelRef(spec, "pretrained", str(path), _dir_fingerprint(path), own, True, str(path) if own else None)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device exists, else ``cpu``."""
    if device not in {"auto", "cpu", "cuda"}:
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InputError("--device cuda asked for, but torch sees no CUDA device")
    return "cpu"


def load_torch_model(path: str, device: str, dtype: str = "float32", trust_remote_code: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **kwargs
    )
    if "quantization_config" not in kwargs:
        model.to(device)
    return model.eval()


def no_tokenizer_reason(ref: ModelRef) -> str:
    return (f"model {ref.spec!r} has no tokenizer: text-based steps need one (give a tokenizer directory with "
            "--tokenizer DIR)")


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    """The tokenizer ``ref`` names (its own, ``--tokenizer``, or the built-in one for synthetic models).

    Raises:
        NotApplicable: the model has none; what needs text is skipped with that reason.

    """
    from transformers import AutoTokenizer

    if ref.tokenizer is None:
        raise NotApplicable(no_tokenizer_reason(ref))
    return AutoTokenizer.from_pretrained(ref.tokenizer, trust_remote_code=trust_remote_code)


def added_bos_token_id(ref: ModelRef, trust_remote_code: bool = False) -> int | None:
    """The BOS id the model's tokenizer puts before a text it encodes, None where it adds none.

    llama.cpp's perplexity tool starts each window with BOS exactly when the vocabulary adds one
    (``add_bos``); a tokenizer that merely defines a BOS token (GPT-2's) does not.
    """
    tok = load_tokenizer(ref, trust_remote_code)
    bos = tok.bos_token_id
    ids = tok("x", add_special_tokens=True, verbose=False)["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def eval_text_path(text: str | None = None) -> Path:
    """The evaluation text: a user file, or the frozen held-out text shipped with the model."""
    path = Path(text) if text else EVAL_TEXT
    if not path.is_file():
        raise InputError(f"evaluation text {str(path)!r} is not a file")
    return path


def eval_token_ids(ref: ModelRef, vocab_size: int, text: str | None = None, trust_remote_code: bool = False,
                   cache_dir: Path | None = None):
    """Token ids of the evaluation text for this model (a 1-D int64 tensor).

    Synthetic models use the built-in tokenizer's ids, which are valid for any vocabulary
    at least as large as its 8192 entries. Encoded once per text, tokenizer and library
    versions, then read from ``cache_dir/tokens`` (the built-in text takes ~0.4 s to encode,
    and every cell is a fresh process that needs its prompts).

    Raises:
        NotApplicable: the model has no tokenizer.
        InputError: the tokenizer's ids do not fit the model's vocabulary.

    """
    ids = encoded_eval_text(ref, text, trust_remote_code, cache_dir)
    if int(ids.max()) >= vocab_size:
        raise InputError(f"model {ref.spec!r} has vocabulary {vocab_size}, too small for the ids of tokenizer "
                         f"{ref.tokenizer}; give its own tokenizer with --tokenizer DIR")
    return ids


def encoded_eval_text(ref: ModelRef, text: str | None = None, trust_remote_code: bool = False,
                      cache_dir: Path | None = None):
    """The evaluation text encoded by the model's tokenizer, read from the cache or encoded and kept there.

    Raises:
        NotApplicable: the model has no tokenizer.

    """
    import torch

    if ref.tokenizer is None:
        raise NotApplicable(no_tokenizer_reason(ref))
    content = eval_text_path(text).read_text(encoding="utf-8")
    path = _token_cache_path(Path(ref.tokenizer), content.encode("utf-8"), trust_remote_code, cache_dir)
    ids = _read_token_cache(path) if path is not None else None
    if ids is None:
        tok = load_tokenizer(ref, trust_remote_code)
        # The whole text is one sequence here, cut into windows within the model's context later
        # (check_context, the drift windows): transformers' warning that it exceeds model_max_length
        # ("will result in indexing errors") would only mislead a reader of the cell's log.
        encoded = tok(content, add_special_tokens=False, verbose=False)["input_ids"]
        ids = torch.tensor(encoded, dtype=torch.long)
        if path is not None:
            _write_token_cache(path, ids)
    return ids


# Tokenizer files are hashed whole up to this size (a 256k-entry tokenizer.json is ~35 MB); a larger file
# beside them is some framework's weights, identified by its size, head and tail as weights are.
_TOKENIZER_FILE_MAX_BYTES = 64 << 20


def _token_cache_path(tokenizer_dir: Path, text: bytes, trust_remote_code: bool, cache_dir: Path | None):
    """Where the ids of ``text`` under this tokenizer are kept; None where the tokenizer is no directory.

    The key hashes the text, every file of the tokenizer's directory but weights (its
    vocabulary, merges, settings and any code; a file over 64 MiB by its size, head and tail),
    ``trust_remote_code`` and the versions of transformers and tokenizers.
    """
    import tokenizers
    import transformers

    if not tokenizer_dir.is_dir():
        return None
    h = hashlib.sha256()
    h.update(json.dumps(["eval-token-ids-1", transformers.__version__, tokenizers.__version__, trust_remote_code,
                         hashlib.sha256(text).hexdigest()]).encode())
    for f in sorted(tokenizer_dir.iterdir()):
        if not f.is_file() or _is_weights(f):
            continue
        if f.stat().st_size > _TOKENIZER_FILE_MAX_BYTES:  # another framework's weights (tf_model.h5, ...)
            _hash_head_and_tail(h, f)
        else:  # streamed: a cell's memory figures never see the tokenizer's files
            with f.open("rb") as fh:
                h.update(f"{f.name}:{hashlib.file_digest(fh, 'sha256').hexdigest()}".encode())
    return Path(cache_dir or default_cache_dir()) / "tokens" / f"{h.hexdigest()[:24]}.npy"


def _read_token_cache(path: Path):
    """The ids stored at ``path``; None where there are none or they are damaged (they are encoded again)."""
    import numpy as np
    import torch

    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if ids.dtype != np.int64 or ids.ndim != 1 or ids.size == 0 or int(ids.min()) < 0:
        return None
    return torch.from_numpy(ids)


def _write_token_cache(path: Path, ids) -> None:
    import io

    import numpy as np

    from optimize.atomic import write_atomic

    buf = io.BytesIO()
    np.save(buf, ids.numpy(), allow_pickle=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())  # whole or absent: a concurrent cell reads the old state or the new
    except OSError:
        pass  # a read-only cache costs the encoding again next time, nothing else
