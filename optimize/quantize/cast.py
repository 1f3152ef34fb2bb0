"""Dtype casts: the whole model's weights and compute in fp16 or bf16."""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

DTYPES = ("float16", "bfloat16")


@register
@dataclass(frozen=True)
class Cast(Step):
    """Cast weights (and so compute) to ``dtype``."""

    technique = "cast"
    stage = "runtime"
    backend = "torch"
    summary = "cast weights and compute to fp16 or bf16"
    dtype: str = "bfloat16"

    def matmul_dtype(self, before: str, device: str) -> str:
        return self.dtype

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError(f"cast.dtype must be one of {DTYPES}, got {self.dtype!r}")

    def apply(self, state) -> dict:
        if self.dtype == "float16" and state.device == "cpu":
            raise NotApplicable("fp16 needs CUDA: CPU matmuls have no fast fp16 kernels here (use bf16)")
        import torch

        from optimize import introspect

        if state.loaded:
            before = introspect.weights_bytes(state.model)
            state.model.to(getattr(torch, self.dtype))
        else:
            # Loading straight in the target dtype never holds the source copy: its size is the checkpoint's.
            before = introspect.checkpoint_bytes(state.source_dir)
            state.load(dtype=self.dtype)
        after = introspect.weights_bytes(state.model)
        floats = [p for p in state.model.parameters() if p.is_floating_point()]
        cast = sum(1 for p in floats if p.dtype == getattr(torch, self.dtype))
        report = introspect.change_report(cast, len(floats), before, after,
                                          parameters_touched=sum(p.numel() for p in floats
                                                                 if p.dtype == getattr(torch, self.dtype)))
        introspect.require_effect(f"cast to {self.dtype}", report, shrinks=True)
        return {"dtype": self.dtype, **report}
