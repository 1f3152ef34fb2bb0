"""Drift scored through the variant's own KV cache: teacher-forced decoding, one token per step.

A full-window forward pass never reads a KV cache, so a variant whose only change is its
cache (quantized, static, compiled, any future eviction or offloading policy) would score
as lossless. Here each evaluation window goes through the variant's own ``generate`` with
its generate kwargs, so the cache is the one the variant generates with: a one-token
prefill, then one token per decode step, each step reading the cache the earlier steps
wrote. A logits processor forces the window's next token (teacher forcing) and the raw
logits of every step (``output_logits``, before any processor) are scored. With a
one-token prefill the scored tokens are exactly those of the full-window path (every
token but each window's first), so the reference's log-probs are reused unchanged. A variant
that decodes with a loop of its own (a static cache's compiled step, ``optimize.decode``) is
scored through that loop the same way.

A forward pre-hook reads the cache before each step: its class, and for quantized caches
how many positions it holds quantized, so the record can say how many scored tokens were
predicted from quantized keys and values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PREFILL_TOKENS = 1
CHUNK_TOKENS = 1  # generate feeds one token per decode step
# Logits of one batch are kept until its last step: (b, T-1, V) float32, about three copies.
LOGITS_BUDGET_BYTES = 256 * 2**20
PATH = ("model.generate with the variant's generate kwargs; a logits processor forces the window's next token "
        "(teacher forcing); raw logits of every step (output_logits) are scored")
DECODER_PATH = ("the variant's own decode loop (optimize.decode: its static cache and compiled one-token step); "
                "a logits processor forces the window's next token (teacher forcing); raw logits of every step are "
                "scored")


def resolve_scoring(requested: str, state) -> tuple[str, str]:
    """The scoring path for ``state``'s variant and why: ``("full-window" | "through-cache", reason)``."""
    from optimize.registry import technique_class

    if requested != "auto":
        return requested, "requested by [drift] scoring"
    cache_steps = [r["technique"] for r in state.reports if technique_class(r["technique"]).changes_kv_cache]
    if not cache_steps:
        return "full-window", "no step of the recipe changes the KV cache"
    if state.generate_kwargs.get("use_cache") is False:
        return "full-window", (f"step {cache_steps[0]!r} turns the KV cache off: every decode step recomputes its "
                               "whole prefix, which is what the full-window pass computes")
    return "through-cache", f"step {cache_steps[0]!r} changes the KV cache"


def batch_windows(windows: int, context: int, vocab: int) -> int:
    """Windows fed together: one-token steps cost per step, not per window, so as many as the logits budget holds."""
    per_window = (context - PREFILL_TOKENS) * vocab * 4
    return max(1, min(windows, LOGITS_BUDGET_BYTES // per_window))


def quantized_positions(cache) -> int:
    """Positions ``cache`` holds quantized (0 for caches that quantize nothing or are empty)."""
    from transformers.cache_utils import QuantizedLayer

    layers = getattr(cache, "layers", None)
    if not layers or not isinstance(layers[0], QuantizedLayer) or not layers[0].is_initialized:
        return 0
    layer = layers[0]  # every layer holds the same positions
    residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0  # full-precision tail, empty after a flush
    return layer.cumulative_length - residual


def cache_settings(cache) -> dict[str, Any]:
    """The cache's own settings, read from the object generate built (what ran, not what was asked)."""
    out: dict[str, Any] = {"class": type(cache).__name__}
    layers = getattr(cache, "layers", None)
    if layers:
        layer = layers[0]
        out["layer_class"] = type(layer).__name__
        for key in ("nbits", "residual_length", "q_group_size", "axis_key", "axis_value", "max_cache_len",
                    "sliding_window"):
            value = getattr(layer, key, None)
            if isinstance(value, (int, float, str, bool)):
                out[key] = value
    return out


class _CacheProbe:
    """Forward pre-hook: the cache each step is about to read, and its quantized positions."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] | None = None
        self.quantized_before: list[int] = []  # per forward step

    def __call__(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None and self.settings is None:
            self.settings = cache_settings(cache)
        self.quantized_before.append(quantized_positions(cache) if cache is not None else 0)


class _RawScores:
    """Logits processor, first in the list: a copy of every step's scores before any other processor."""

    def __init__(self) -> None:
        self.scores: list[Any] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())  # the step's buffer is reused by the next step
        return scores


class _ForceNext:
    """Logits processor: make the window's next token the only choice (teacher forcing)."""

    def __init__(self, windows) -> None:
        self.windows = windows  # (b, T) on the model's device

    def __call__(self, input_ids, scores):
        target = self.windows[:, input_ids.shape[1] : input_ids.shape[1] + 1]  # (b, 1)
        return scores.new_full(scores.shape, float("-inf")).scatter_(1, target, 0.0)  # new tensor: raw logits kept


@contextmanager
def _one_cpu_thread(device: str):
    """One intra-op thread on the CPU for the duration of the block."""
    # One-token steps are too small to split, and on a busy machine OpenMP threads waiting for
    # each other made them 10-20x slower (measured on the built-in model, 2 cores, load ~10).
    import torch

    if device != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CacheScorer:
    """Log-probs of every scored token of the evaluation windows, read through the variant's cache.

    Args:
        state: the loaded variant (``VariantState``): its model and generate kwargs.
        cache_factory: builds a fresh cache for each batch, for a cache that generate kwargs
            cannot name; None lets the variant's generate kwargs choose, as in generation.

    """

    def __init__(self, state, cache_factory: Callable[[], Any] | None = None) -> None:
        self.state = state
        self.cache_factory = cache_factory
        self.probe = _CacheProbe()
        self.batch = 0
        self.steps_per_window = 0
        self.observed = False

    def logprob_batches(self, windows) -> Iterator[tuple[int, Any]]:
        """Yield ``(start, logprobs)``: (b, T-1, V) float32, row t predicts token t+1, like the full-window pass."""
        import torch

        model = self.state.model
        vocab = model.config.vocab_size
        self.batch = batch_windows(len(windows), windows.shape[1], vocab)
        self.steps_per_window = windows.shape[1] - PREFILL_TOKENS
        # A decode loop of the variant's own (a compiled step) would trace the hook into its graph and
        # recompile every step: the quantized positions are then not observed, and the record says so.
        self.observed = isinstance(model, torch.nn.Module) and self.state.decoder is None
        hook = model.register_forward_pre_hook(self.probe, with_kwargs=True) if self.observed else None
        try:
            for start in range(0, len(windows), self.batch):
                ids = windows[start : start + self.batch]
                logits = self._forced_logits(ids.to(self.state.device))  # (b, T-1, V)
                bad = int((~torch.isfinite(logits)).any(-1).sum())
                if bad:
                    raise RuntimeError(f"the variant produced non-finite logits through its cache at {bad} of "
                                       f"{logits.shape[0] * logits.shape[1]} positions (windows {start}..)")
                yield start, torch.log_softmax(logits, dim=-1)
                del logits
        finally:
            if hook is not None:
                hook.remove()

    def _forced_logits(self, ids):
        """(b, T) windows -> (b, T-1, V) float32 raw logits of generate's steps, forced along ``ids``."""
        if self.state.decoder is not None:
            return self._forced_through_decoder(ids)
        import torch
        from transformers import LogitsProcessorList

        model = self.state.model
        config = model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        pad = (pad[0] if isinstance(pad, list) else pad) or 0
        kwargs = copy.deepcopy(self.state.generate_kwargs)  # generate pops keys from cache_config in place
        if self.cache_factory is not None:
            kwargs["past_key_values"] = self.cache_factory()
        prompt = ids[:, :PREFILL_TOKENS]
        with _one_cpu_thread(self.state.device), torch.inference_mode():
            # eos_token_id=None: a forced end-of-sequence token must not stop a window early.
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=ids.shape[1] - PREFILL_TOKENS, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True, logits_processor=LogitsProcessorList([_ForceNext(ids)]),
                                 **kwargs)
            if not torch.equal(out.sequences, ids):
                raise RuntimeError("teacher forcing failed: generate did not follow the evaluation window")
            if self.probe.settings is None and out.past_key_values is not None:
                self.probe.settings = cache_settings(out.past_key_values)  # the cache generate used
            return torch.stack(out.logits, dim=1).float()

    def _forced_through_decoder(self, ids):
        """``_forced_logits`` through the variant's own decode loop (``optimize.decode``): what it generates with."""
        import torch

        raw = _RawScores()
        with _one_cpu_thread(self.state.device):
            out = self.state.decoder.generate(self.state.model, ids[:, :PREFILL_TOKENS], ids.shape[1] - PREFILL_TOKENS,
                                              [raw, _ForceNext(ids)], never_end=False)
        if not torch.equal(out, ids):
            raise RuntimeError("teacher forcing failed: the decode loop did not follow the evaluation window")
        if self.probe.settings is None:
            self.probe.settings = cache_settings(self.state.decoder.cache)
        return torch.stack(raw.scores, dim=1)

    def method(self, windows: int, first_scored_row: int = 0) -> dict[str, Any]:
        """How the figures were taken, and how many scored tokens read quantized cache entries.

        Step j of a window produces its row j; rows before ``first_scored_row`` are not scored.
        """
        q = self.probe.quantized_before  # one per forward step, batches in order
        # windows scored by each step: the last batch may be partial, and unscored rows weigh nothing
        weights = [min(self.batch, windows - (i // self.steps_per_window) * self.batch)
                   if i % self.steps_per_window >= first_scored_row else 0 for i in range(len(q))]
        assert not q or len(q) == -(-windows // self.batch) * self.steps_per_window, (len(q), windows, self.batch)
        scored = sum(weights)
        return {
            "path": DECODER_PATH if self.state.decoder is not None else PATH,
            "prefill_tokens": PREFILL_TOKENS,
            "chunk_tokens": CHUNK_TOKENS,
            "batch_windows": self.batch,
            "steps_per_window": self.steps_per_window,
            "cache": self.probe.settings or {"class": "unknown (the model is not a torch module)"},
            "generate_kwargs": {k: v for k, v in self.state.generate_kwargs.items()
                                if isinstance(v, (int, float, str, bool))} | _cache_config(self.state),
            "scored_tokens_reading_quantized": sum(w for w, n in zip(weights, q, strict=True) if n > 0)
            if self.observed else None,
            "quantized_positions_read_mean": (sum(w * n for w, n in zip(weights, q, strict=True)) / scored
                                              if scored else 0.0) if self.observed else None,
            "quantized_positions_observed": self.observed,
            "cpu_threads": 1 if self.state.device == "cpu" else None,
        }


def _cache_config(state) -> dict[str, Any]:
    config = state.generate_kwargs.get("cache_config")
    if not isinstance(config, dict):
        return {}
    return {"cache_config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}}
