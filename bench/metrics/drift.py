"""Accuracy drift of a variant against the fp32 reference, as llama.cpp's perplexity tool reports it.

The evaluation text is tokenized as one stream and cut into non-overlapping windows of
``context`` tokens; the first ``max_tokens // context`` windows are used. Each window is an
independent sequence (no overlap). Under the default protocol (``all-but-first``) there is no
BOS and every token but the window's first is scored given all earlier tokens of its window;
under ``llama.cpp`` (llama-perplexity's) the window's first token is replaced by BOS where the
tokenizer adds one and only rows ``context // 2`` on are scored, each token with at least
``context / 2`` tokens before it.

The fp32 reference runs once per (model, text, settings) and its full log-softmax at every
scored position is cached, so each variant needs one pass of its own. Cache layout::

    <cache>/drift/<key>/reference.safetensors
        windows            (W, T)       int64    the scored token windows
        logprobs           (W, S, V)    float32  reference log-softmax of the scored rows: S = T-1-first,
                                                  row i predicts token first+i+1 (first: 0, or T//2 for llama.cpp)
        gen_prompts        (P, Lp)      int64    fixed prompts for generation agreement
        gen_continuations  (P, N)       int64    the reference's greedy continuations
    <cache>/drift/<key>/reference.json  method, key, sizes, reference perplexity

``logprobs`` dominates: W x (T-1) x V x 4 bytes, about 255 MiB at the defaults for an
8192-token vocabulary (the built-in and tiny models), 1 GiB for 32k, 4 GiB for 128k.
It is written and read a few windows at a time, never held whole in memory.

KL divergence is in nats (per-token figures: ``bench.metrics.drift_figures``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from bench.metrics.drift_config import SCORINGS, DriftBudget, DriftConfig  # noqa: F401 (re-exported)
from bench.metrics.drift_figures import generation_agreement, summarize_drift, token_drift
from bench.results import utc_now
from optimize.atomic import build_dir_atomically
from optimize.errors import InputError

METHOD_VERSION = 1
REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_JSON = "reference.json"
PROTOCOL = ("non-overlapping windows of `context` tokens from the start of the evaluation text, each an "
           "independent sequence (no BOS); every token but the first of each window is scored")
PROTOCOL_LLAMA_CPP = ("llama.cpp's perplexity protocol: non-overlapping windows of `context` tokens from the start "
                      "of the evaluation text, each an independent sequence whose first token is replaced by BOS "
                      "where the tokenizer adds one; only the second half of each window is scored (context - 1 - "
                      "context/2 tokens per window, each with at least context/2 tokens before it)")
PROTOCOL_TEXT = {"all-but-first": PROTOCOL, "llama.cpp": PROTOCOL_LLAMA_CPP}


# --- the reference pass ---------------------------------------------------------------


def reference_path(ref, cfg: DriftConfig, cache_dir: Path, device: str = "cpu", eval_text: str | None = None) -> Path:
    """Where the reference for these settings lives (it may not exist yet)."""
    from optimize.libraries import libraries
    from optimize.models import eval_text_path
    from optimize.store import library_versions

    payload = {
        "model": ref.fingerprint,
        # The tokens scored come from the tokenizer: a model given another one (--tokenizer) is another reference.
        "tokenizer": _tokenizer_sha256(getattr(ref, "tokenizer", None)),
        "text_sha256": hashlib.sha256(eval_text_path(eval_text).read_bytes()).hexdigest(),
        **cfg.reference_settings(),
        "device": device,  # fp32 kernels differ between CPU and CUDA in the last bits
        "versions": library_versions(libraries("reference")),
        "method_version": METHOD_VERSION,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "drift" / key


TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece", "sentencepiece")


def _tokenizer_sha256(directory: str | None) -> str | None:
    """Content hash of a tokenizer directory's tokenizer files (not its weights); None when the model has its own."""
    if not directory:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.name.startswith(TOKENIZER_FILES):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_reference(ref, cfg: DriftConfig, cache_dir: Path, device: str = "cpu", eval_text: str | None = None,
                     trust_remote_code: bool = False) -> Path:
    """Run the fp32 reference over the evaluation windows once; later calls return the cached directory.

    Built in a temporary directory and renamed into place, so a crash leaves no half
    reference and concurrent cells end with one copy. ``reference.json`` records
    ``reference_wall_s``, the time the pass took when it ran.
    """
    cfg.validate()
    final = reference_path(ref, cfg, cache_dir, device, eval_text)
    if (final / REFERENCE_JSON).exists():
        return final
    build_dir_atomically(final, lambda tmp: _compute_reference(ref, cfg, device, eval_text, trust_remote_code, tmp,
                                                               final.name))
    return final


def token_windows(stream, cfg: DriftConfig):
    """(W, context) windows from the start of ``stream``: the first ``max_tokens // context`` full ones."""
    count = min(cfg.windows, len(stream) // cfg.context)
    if count < 1:
        raise InputError(f"evaluation text has {len(stream)} tokens, fewer than drift context {cfg.context}")
    return stream[: count * cfg.context].reshape(count, cfg.context)


def gen_prompt_offsets(stream_tokens: int, cfg: DriftConfig) -> list[int]:
    """Evenly spaced, fixed start offsets of the generation prompts in the token stream."""
    span = stream_tokens - cfg.gen_prompt_tokens
    if span < 0:
        raise InputError(f"evaluation text has {stream_tokens} tokens, fewer than drift gen_prompt_tokens "
                         f"{cfg.gen_prompt_tokens}")
    return [i * span // cfg.gen_prompts for i in range(cfg.gen_prompts)]


def _compute_reference(ref, cfg: DriftConfig, device: str, eval_text: str | None, trust_remote_code: bool,
                       out: Path, key: str) -> None:
    import torch

    from bench.generation import greedy_generate
    from bench.metrics.safetensors_stream import write_safetensors_streamed
    from optimize import models
    from optimize.libraries import libraries
    from optimize.state import VariantState
    from optimize.store import library_versions

    t0 = time.perf_counter()
    model = models.load_torch_model(ref.path, device, "float32", trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(cfg.context, cfg.gen_prompt_tokens + cfg.gen_new_tokens)
    if limit is not None and longest > limit:
        raise InputError(f"drift needs sequences of {longest} tokens; model {ref.spec!r} takes at most {limit}")
    stream = models.eval_token_ids(ref, vocab, eval_text, trust_remote_code)
    windows = token_windows(stream, cfg)
    bos = models.added_bos_token_id(ref, trust_remote_code) if cfg.protocol == "llama.cpp" else None
    if bos is not None:
        windows = windows.clone()
        windows[:, 0] = bos  # llama-perplexity overwrites the window's first token, unscored in any protocol
    first = cfg.first_scored_row
    offsets = gen_prompt_offsets(len(stream), cfg)
    prompts = torch.stack([stream[s : s + cfg.gen_prompt_tokens] for s in offsets])  # (P, Lp)
    state = VariantState(ref=ref, device=device, source_dir=Path(ref.path), trust_remote_code=trust_remote_code)
    state.model = model
    continuations = greedy_generate(state, prompts, cfg.gen_new_tokens)[:, cfg.gen_prompt_tokens :].cpu()

    nll_sum = 0.0

    def logprob_rows():
        nonlocal nll_sum
        for start, lp in _logprob_batches(model, windows, cfg.batch_windows, device, "torch"):
            lp = lp[:, first:]
            targets = windows[start : start + lp.shape[0], first + 1 :].to(lp.device)
            nll_sum -= float(lp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))
            yield lp

    shape = (len(windows), cfg.context - 1 - first, vocab)
    small = {"windows": windows, "gen_prompts": prompts, "gen_continuations": continuations}
    write_safetensors_streamed(out / REFERENCE_TENSORS, small, ("logprobs", shape, logprob_rows()),
                       {"format": "pt", "key": key})
    scored = shape[0] * shape[1]
    info = {
        "key": key,
        "model": ref.to_dict(),
        "eval_text": str(models.eval_text_path(eval_text)),
        "eval_text_tokens": len(stream),
        "settings": cfg.reference_settings(),
        "device": device,
        "method": {"version": METHOD_VERSION, "scoring": PROTOCOL_TEXT[cfg.protocol], "windows": shape[0],
                   "context": cfg.context, "vocab": vocab, "scored_tokens": scored, "gen_prompt_offsets": offsets,
                   "logprobs": "float32 log-softmax of the fp32 reference over the full vocabulary",
                   "protocol_name": cfg.protocol, "first_scored_row": first, "window_bos_token_id": bos},
        "reference_perplexity": math.exp(nll_sum / scored),
        "file_bytes": (out / REFERENCE_TENSORS).stat().st_size,
        "reference_wall_s": round(time.perf_counter() - t0, 3),
        "versions": library_versions(libraries("reference")),
        "created": utc_now(),
    }
    (out / REFERENCE_JSON).write_text(json.dumps(info, indent=1) + "\n")


def _logprob_batches(model, windows, batch_windows: int, device: str, backend: str):
    """Yield ``(start, logprobs)`` per batch of windows; logprobs (b, T-1, V) float32, row t predicts token t+1."""
    import torch

    extra = {"use_cache": False} if backend == "torch" else {}  # a full-window pass needs no KV cache
    for start in range(0, len(windows), batch_windows):
        ids = windows[start : start + batch_windows].to(device)  # (b, T)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[:, :-1].float()
            bad = int((~torch.isfinite(logits)).any(-1).sum())
            if bad:
                positions = logits.shape[0] * logits.shape[1]
                raise RuntimeError(f"the model produced non-finite logits at {bad} of {positions} positions "
                                   f"(windows {start}..{start + len(ids) - 1})")
            lp = torch.log_softmax(logits, dim=-1)
        yield start, lp  # outside inference_mode: a suspended generator must not leave it switched on


# --- measuring a variant --------------------------------------------------------------


def measure_drift(state, reference: Path, cfg: DriftConfig, cache_factory=None) -> dict[str, Any]:
    """Drift of the loaded variant ``state`` against the reference at ``reference`` (from ``ensure_reference``).

    ``cfg.scoring`` chooses the path (``drift_incremental.resolve_scoring``): full-window
    passes through the variant's forward ``cfg.batch_windows`` windows at a time, or
    teacher-forced decoding through the variant's KV cache. Only one batch of variant
    logits and reference log-probs is in memory at once. ``cache_factory`` (through the
    cache only) builds the cache for each batch instead of the variant's generate kwargs.
    """
    import torch
    from safetensors import safe_open

    from bench.generation import greedy_generate
    from bench.metrics.drift_incremental import CacheScorer, resolve_scoring

    t0 = time.perf_counter()
    reference = Path(reference)
    info = json.loads((reference / REFERENCE_JSON).read_text())
    if info["settings"] != cfg.reference_settings():
        raise InputError(f"drift settings {cfg.reference_settings()} differ from those of the reference at "
                         f"{reference} ({info['settings']}); call ensure_reference with the same config")
    if info["model"]["fingerprint"] != state.ref.fingerprint:
        raise InputError(f"the reference at {reference} is for model {info['model']['spec']!r}, "
                         f"not {state.ref.spec!r}")
    scoring, reason = resolve_scoring(cfg.scoring, state)
    scorer = CacheScorer(state, cache_factory) if scoring == "through-cache" else None
    parts: list[dict] = []
    with safe_open(str(reference / REFERENCE_TENSORS), framework="pt", device="cpu") as f:
        windows = f.get_tensor("windows")  # (W, T)
        ref_lp = f.get_slice("logprobs")  # (W, S, V), the scored rows, read lazily per batch
        first = cfg.first_scored_row
        batches = scorer.logprob_batches(windows) if scorer else _logprob_batches(
            state.model, windows, cfg.batch_windows, state.device, state.backend)
        for start, var_lp in batches:
            var_lp = var_lp[:, first:]
            stop = start + var_lp.shape[0]
            lp = ref_lp[start:stop].to(var_lp.device)
            if lp.shape != var_lp.shape:
                raise InputError(f"variant log-probs {tuple(var_lp.shape)} do not match the reference's "
                                 f"{tuple(lp.shape)}: different vocabulary?")
            parts.append(token_drift(lp, var_lp, windows[start:stop, first + 1 :].to(var_lp.device)))
            del lp, var_lp
        prompts, ref_cont = f.get_tensor("gen_prompts"), f.get_tensor("gen_continuations")
    metrics: dict[str, Any] = summarize_drift({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    metrics["drift_through_cache"] = scorer is not None
    var_cont = greedy_generate(state, prompts, cfg.gen_new_tokens)[:, prompts.shape[1] :].cpu()
    metrics.update(generation_agreement(ref_cont, var_cont))
    method = dict(info["method"])
    method["protocol"] = method.pop("scoring")  # reference.json names the window protocol "scoring"
    # References cached before the protocol could be chosen are all-but-first ones without these keys.
    method.setdefault("protocol_name", cfg.protocol)
    method.setdefault("first_scored_row", first)
    method.setdefault("window_bos_token_id", None)
    metrics["drift_method"] = {
        **method, "scoring": scoring, "scoring_reason": reason, "reference_key": info["key"],
        "reference_device": info["device"],
        "reference_trained": info["model"]["trained"],  # False: random weights, figures show mechanics only
        "batch_windows": scorer.batch if scorer else cfg.batch_windows,
        "kld": "KL(reference || variant), nats, full vocabulary",
        "gen": f"greedy, {cfg.gen_new_tokens} new tokens from {cfg.gen_prompts} prompts of {cfg.gen_prompt_tokens}",
        "percentiles": "numpy linear interpolation",
    }
    if scorer:
        metrics["drift_method"]["through_cache"] = through = scorer.method(len(windows), first)
        if through["quantized_positions_observed"]:
            metrics["drift_kv_quantized_scored_tokens"] = through["scored_tokens_reading_quantized"]
    metrics["drift_wall_s"] = round(time.perf_counter() - t0, 3)
    return metrics
