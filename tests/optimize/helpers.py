"""Helpers shared by the quantization tests."""

from optimize.recipe import Recipe


def load_step(ref, cache_dir, step, device="cpu"):
    from optimize.store import VariantStore, load_variant

    state, _ = load_variant(ref, Recipe(name="under-test", steps=(step,) if step else ()), device,
                            VariantStore(cache_dir))
    return state


def synthetic_fp32(name: str, cache_dir, batch: int = 2, tokens: int = 12):
    """(ref, store, fp32 state, prompts (batch, tokens)) of the synthetic model ``name``."""
    from bench.prompts import prompt_ids
    from optimize.models import resolve_model
    from optimize.store import VariantStore, load_variant

    ref = resolve_model(f"synthetic:{name}", cache_dir)
    store = VariantStore(cache_dir)
    state, _ = load_variant(ref, Recipe(name="fp32"), "cpu", store)
    prompts, _ = prompt_ids(ref, state.model.config.vocab_size, batch, tokens)
    return ref, store, state, prompts


def logits_of(state, ids):
    import torch

    with torch.inference_mode():
        return state.model(ids.to(state.device)).logits.float().cpu()  # (B, T, V)


def agreement(logits, reference) -> tuple[float, float]:
    """(Pearson correlation of all logits, fraction of positions with the same top-1 token)."""
    import torch

    corr = torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1].item()
    return corr, (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def linear_fp32_bytes(model) -> int:
    """fp32 bytes of the linear weights a quantizer targets (all but lm_head)."""
    import torch

    head = model.get_output_embeddings()
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
