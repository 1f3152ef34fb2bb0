"""Helpers shared by the quantization tests."""

from optimize.recipe import Recipe


def load_step(ref, cache_dir, step, device="cpu"):
    from optimize.store import VariantStore, load_variant

    state, _ = load_variant(ref, Recipe(name="under-test", steps=(step,) if step else ()), device,
                            VariantStore(cache_dir))
    return state


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
