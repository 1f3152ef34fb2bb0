"""Unstructured magnitude pruning of linear weights, made permanent."""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

SCOPES = ("layer", "global")


def prunable_linears(model, include_lm_head: bool = False):
    """``(name, module)`` of the linear-like layers (``nn.Linear``, ``Conv1D``); the LM head only if asked."""
    from optimize.introspect import linear_layers

    for layer in linear_layers(model, include_lm_head):
        yield layer.name, layer.module


def sparsity_report(model, include_lm_head: bool = False) -> dict:
    zeros = total = 0
    for _, module in prunable_linears(model, include_lm_head):
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return {"sparsity_achieved": zeros / total if total else 0.0, "pruned_weights": zeros, "prunable_weights": total}


@register
@dataclass(frozen=True)
class MagnitudePrune(Step):
    """Zero the smallest-magnitude weights of every decoder linear layer."""

    technique = "prune-magnitude"
    stage = "weights"
    backend = "torch"
    summary = "unstructured magnitude pruning (per layer or global)"
    sparsity: float = 0.5  # fraction of weights set to zero, 0 < sparsity < 1
    scope: str = "layer"
    include_lm_head: bool = False

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise RecipeError(f"prune-magnitude.sparsity must be in (0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise RecipeError(f"prune-magnitude.scope must be one of {SCOPES}, got {self.scope!r}")

    def apply(self, state) -> dict:
        import torch
        import torch.nn.utils.prune as prune

        layers = [(m, "weight") for _, m in prunable_linears(state.model, self.include_lm_head)]
        if self.scope == "global":
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=self.sparsity)
        else:
            for module, name in layers:
                prune.l1_unstructured(module, name, amount=self.sparsity)
        with torch.no_grad():
            for module, name in layers:
                prune.remove(module, name)  # bake the mask into the weight: permanent, plain tensors
        report = sparsity_report(state.model, self.include_lm_head)
        if not report["pruned_weights"]:
            raise NotApplicable(f"prune-magnitude found no linear-like layer to prune in {type(state.model).__name__}")
        return {"sparsity_target": self.sparsity, "scope": self.scope, "modules_touched": len(layers), **report}
