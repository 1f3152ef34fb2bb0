"""Fixed prompts: token windows of the evaluation text at seeded offsets, never random noise."""

from __future__ import annotations


def prompt_ids(ref, vocab_size: int, batch_size: int, prompt_tokens: int, seed: int = 0,
               eval_text: str | None = None, trust_remote_code: bool = False):
    """A (batch_size, prompt_tokens) int64 tensor of real text, the same for every variant.

    Returns:
        (ids, source): source is "eval-text" or, for models whose vocabulary cannot hold
        the evaluation tokens, "random" (seeded uniform ids, for speed-only runs).

    """
    import torch

    from optimize.errors import InputError
    from optimize.models import eval_token_ids

    try:
        stream = eval_token_ids(ref, vocab_size, eval_text, trust_remote_code)
    except InputError:
        if ref.trained:
            raise
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=gen), "random"
    if len(stream) < prompt_tokens + 1:
        raise InputError(f"evaluation text has {len(stream)} tokens, fewer than --prompt-tokens {prompt_tokens}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - prompt_tokens, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + prompt_tokens] for s in starts.tolist()]), "eval-text"
