"""Fixed prompts: token windows of the evaluation text at seeded offsets, or seeded random ids.

``prompt_source`` chooses:

- ``"eval-text"``: windows of the evaluation text, encoded with the model's tokenizer;
- ``"random"``: seeded uniform ids within the vocabulary (speed-only runs; what
  optimum-benchmark always uses);
- ``"auto"`` (default): the evaluation text where the model has a tokenizer whose ids fit its
  vocabulary, else random ids. The record says which one was used.
"""

from __future__ import annotations

PROMPT_SOURCES = ("auto", "eval-text", "random")


def check_prompt_source(source: str) -> str:
    from optimize.errors import InputError

    if source not in PROMPT_SOURCES:
        raise InputError(f"prompt_source must be one of {', '.join(PROMPT_SOURCES)}, got {source!r}")
    return source


def random_prompt_ids(vocab_size: int, batch_size: int, prompt_tokens: int, seed: int = 0):
    """(batch_size, prompt_tokens) int64 ids drawn uniformly from [0, vocab_size) with ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=gen)


def prompt_ids(ref, vocab_size: int, batch_size: int, prompt_tokens: int, seed: int = 0,
               eval_text: str | None = None, trust_remote_code: bool = False, source: str = "auto",
               cache_dir=None):
    """A (batch_size, prompt_tokens) int64 tensor, the same for every variant of a model.

    The evaluation text's ids are read from ``cache_dir`` (None: the default cache) once encoded.

    Returns:
        (ids, source): source is "eval-text" or "random".

    Raises:
        InputError: ``source`` is "eval-text" but the model has no usable tokenizer, or the
            text is shorter than one prompt.

    """
    import torch

    from optimize.errors import InputError, NotApplicable
    from optimize.models import eval_text_path, eval_token_ids

    check_prompt_source(source)
    if source == "random":
        return random_prompt_ids(vocab_size, batch_size, prompt_tokens, seed), "random"
    eval_text_path(eval_text)  # a missing evaluation file is an input error, never a fall back to random ids
    try:
        stream = eval_token_ids(ref, vocab_size, eval_text, trust_remote_code, cache_dir)
    except (NotApplicable, InputError) as exc:
        if source == "eval-text":
            raise InputError(f"prompt_source 'eval-text': {exc}") from None
        if isinstance(exc, InputError) and ref.trained and ref.has_tokenizer:
            raise  # the model's own tokenizer does not fit its vocabulary: a broken model directory
        return random_prompt_ids(vocab_size, batch_size, prompt_tokens, seed), "random"
    if len(stream) < prompt_tokens + 1:
        raise InputError(f"the evaluation text is {len(stream)} tokens long; a prompt of {prompt_tokens} tokens "
                         f"needs at least {prompt_tokens + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - prompt_tokens, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + prompt_tokens] for s in starts.tolist()]), "eval-text"
