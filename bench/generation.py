"""Greedy generation of a loaded variant: what scenarios time and drift scores against.

Below both ``bench.scenarios`` and ``bench.metrics`` so neither imports the other for it.
"""

from __future__ import annotations

from typing import Any


def generate_kwargs(state, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding that always produces ``new_tokens`` tokens (optimum-benchmark's rule)."""
    config = state.model.config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    # Nested settings are copied: generate() rewrites a cache_config in place (drops "backend", adds
    # "config"), which would otherwise change the variant's settings for every later call.
    own = {k: dict(v) if isinstance(v, dict) else v for k, v in state.generate_kwargs.items()}
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad,
            **own}


def last_logits_only(state) -> bool:
    """Whether the prompt pass computes the last position's logits alone.

    ``generate()`` passes ``logits_to_keep=1`` to a transformers model whose forward takes it;
    an exported ONNX graph computes every position's logits (optimum exports it that way).
    """
    supports = getattr(state.model, "_supports_logits_to_keep", None)
    return state.backend == "torch" and callable(supports) and bool(supports())


def decode_loop(state) -> str:
    """How ``greedy_generate`` produces the variant's tokens, as its records say (``method.decode_loop``)."""
    if state.decoder is not None:
        return ("the variant's own greedy loop (optimize.decode): prefill eager, then one call of the compiled "
                "one-token step per token, no host read between tokens")
    return "transformers generate() (greedy, min_new_tokens = new_tokens)"


def greedy_generate(state, input_ids, new_tokens: int, logits_processor=None):
    """Greedy continuation of ``input_ids`` (B, P) -> (B, P + new_tokens)."""
    import torch
    from transformers import LogitsProcessorList

    model = state.model
    input_ids = input_ids.to(state.device)
    if state.decoder is not None:  # the variant's own decode loop (a static cache's compiled step)
        out = state.decoder.generate(model, input_ids, new_tokens, logits_processor)
        assert out.shape == (input_ids.shape[0], input_ids.shape[1] + new_tokens), out.shape
        return out
    kwargs = generate_kwargs(state, new_tokens)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             logits_processor=LogitsProcessorList(logits_processor or []), **kwargs)
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + new_tokens), out.shape
    return out
