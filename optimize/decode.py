"""Greedy decoding against a static KV cache with a compiled one-token step: gpt-fast's loop.

``generate()`` spends its decode steps in Python around the model: it prepares inputs, builds
the attention mask, copies logits, runs stopping criteria and reads a device tensor back to
decide whether to go on (one host-device synchronisation per token). With the model's decode
step replayed as a CUDA graph, that host time is most of a token's time. This loop keeps
only what a greedy step needs: the prompt's forward runs eagerly and fills the cache, then
each token is one call of the compiled step (the model's forward on one token plus the
float32 logits of its last position, end-of-sequence made impossible), the logits
processors, an argmax and two small in-place writes. Nothing waits for the device until the
caller reads the tokens. The compiled step's guards are checked in full at the first step of
each call; the later steps of the call skip those that tell no two compiled versions apart
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: about 0.1 ms a token on one core of
a 2-core Xeon VM), since nothing they check changes between the steps of one call.

What it computes is ``generate()``'s greedy decoding with ``cache_implementation="static"``:
the same cache class, the same positions, a mask with the same ones (the prompt and every
token so far; unpadded prompts), the same float32 scores handed to the processors, with the
end-of-sequence tokens at -inf as ``min_new_tokens`` sets them (every token is generated). The
tests hold it to ``generate()``'s tokens.
"""

from __future__ import annotations

import inspect
from typing import Any


class StaticDecoder:
    """Greedy decoding of one model with a static cache and a one-token step compiled by ``compile_config``.

    The cache is kept between calls of the same batch size and length (reset in place, so a
    CUDA graph captured against its tensors stays valid), as ``generate()`` keeps its own.

    Args:
        compile_config: transformers' ``CompileConfig`` for the decode step (``torch.compile``
            settings); None runs the step eagerly.

    """

    def __init__(self, compile_config=None) -> None:
        self.compile_config = compile_config
        self._model = None
        self._step = None
        self._end: tuple[int, ...] = ()
        self._cache = None
        self._cache_key: tuple | None = None

    def generate(self, model, input_ids, new_tokens: int, logits_processor=None, never_end: bool = True):
        """Greedy continuation of ``input_ids`` (B, P) -> (B, P + new_tokens), on the model's device.

        ``logits_processor`` (a list of processors) is called once per token with the tokens
        so far and that step's float32 scores (B, V), as ``generate()`` calls it; the scores
        are valid until the next step (a CUDA graph's output buffer is reused), so a
        processor that keeps them copies them. ``never_end=False`` leaves the end-of-sequence
        tokens' scores as they are (teacher forcing scores the raw logits).
        """
        import torch
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList(logits_processor or [])
        batch, prompt = input_ids.shape
        end = end_ids(model) if never_end else ()
        length = prompt + new_tokens
        device = input_ids.device
        with torch.inference_mode():  # the cache's tensors are made and reset under it
            cache = self._reset_cache(model, batch, length)
            step = self._compiled_step(model, end)
            tokens = torch.empty(batch, length, dtype=torch.long, device=device)
            tokens[:, :prompt] = input_ids
            slots = torch.arange(length, device=device)
            # No attention mask: causality alone hides the empty slots beyond the prompt from every prompt
            # token (the same mask as generate()'s padded one, for unpadded prompts), and transformers then
            # builds no padding mask (2 of the 3 ms the static cache's prefill took over a dynamic cache's,
            # 12 ms, on a 2-core CPU).
            out = model(input_ids=input_ids, cache_position=slots[:prompt], past_key_values=cache, use_cache=True,
                        **_prefill_extras(model, slots[:prompt], batch))
            first = _never_end(out.logits[:, -1, :].float(), end)
            del out
            position = slots[prompt : prompt + 1].clone()  # the step's input buffer, advanced in place
            token = _choose(processors, tokens, prompt, first)
            del first

            def advance(token, i: int):
                # no name holds the last step's logits: a CUDA graph's replay writes over them
                token = _choose(processors, tokens, i, step(token, position, cache, length))
                position.add_(1)
                return token

            if length > prompt + 1:
                token = advance(token, prompt + 1)  # the first step checks every guard of the compiled step
            # The others skip the guards that tell no two compiled versions apart: nothing they check
            # (the model, the cache object, the shapes) changes between the steps of one call.
            with self._known_guards():
                for i in range(prompt + 2, length):
                    token = advance(token, i)
        return tokens

    def _known_guards(self):
        import contextlib

        import torch

        if self.compile_config is None:
            return contextlib.nullcontext()
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)

    @property
    def cache(self):
        """The static cache of the last call (None before the first)."""
        return self._cache

    def _reset_cache(self, model, batch: int, length: int):
        from transformers import StaticCache

        key = (id(model), batch, length)
        if self._cache_key != key:
            self._cache = StaticCache(config=model.config, max_cache_len=length)
            self._cache_key = key
        else:
            self._cache.reset()  # zeroes the tensors in place: a captured graph keeps reading them
        return self._cache

    def _compiled_step(self, model, end: tuple[int, ...]):
        if self._step is not None and self._model is model and self._end == end:
            return self._step
        import torch

        from optimize.errors import NotApplicable

        if self.compile_config is not None and not getattr(model, "_can_compile_fullgraph", False):
            raise NotApplicable(f"static-kv compile: {type(model).__name__} does not declare its forward compilable "
                                "as one graph (transformers' _can_compile_fullgraph is false)")

        with_positions = "position_ids" in inspect.signature(model.forward).parameters

        def one_token(token, position, cache, length: int):
            """One decode step: the forward on ``token`` (B, 1) at ``position`` (1,); its float32 logits (B, V)."""
            batch = token.shape[0]
            extras: dict[str, Any] = {}
            if with_positions:
                extras["position_ids"] = position.unsqueeze(0).expand(batch, -1)
            seen = torch.arange(length, device=token.device) <= position  # the prompt and every token so far
            out = model(input_ids=token, attention_mask=seen.long().expand(batch, -1), cache_position=position,
                        past_key_values=cache, use_cache=True, **extras)
            return _never_end(out.logits[:, -1, :].float(), end)

        config = self.compile_config
        self._step = one_token if config is None else torch.compile(one_token, **config.to_dict())
        self._model, self._end = model, end
        return self._step


def _prefill_extras(model, positions, batch: int) -> dict[str, Any]:
    """The prompt pass's position ids, and ``logits_to_keep=1`` where the forward takes it (as ``generate()`` does)."""
    params = inspect.signature(model.forward).parameters
    extras: dict[str, Any] = {}
    if "position_ids" in params:
        extras["position_ids"] = positions.unsqueeze(0).expand(batch, -1)
    if "logits_to_keep" in params:
        extras["logits_to_keep"] = 1
    return extras


def _choose(processors, tokens, i: int, logits):
    """Token ``i``: the argmax of the processed scores, written into ``tokens``; returned as (B, 1)."""
    scores = processors(tokens[:, :i], logits) if processors else logits
    token = scores.argmax(dim=-1, keepdim=True)
    tokens[:, i : i + 1] = token
    return token


def end_ids(model) -> tuple[int, ...]:
    """The model's end-of-sequence token ids (its generation config's, as ``generate()`` reads them)."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def _never_end(scores, end: tuple[int, ...]):
    """``scores`` with the end-of-sequence tokens at -inf, in place: ``min_new_tokens``' rule."""
    if end:
        scores[:, list(end)] = float("-inf")
    return scores
