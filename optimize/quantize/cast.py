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

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError(f"cast.dtype must be one of {DTYPES}, got {self.dtype!r}")

    def apply(self, state) -> dict:
        if self.dtype == "float16" and state.device == "cpu":
            raise NotApplicable("fp16 needs CUDA: CPU matmuls have no fast fp16 kernels here (use bf16)")
        import torch

        if state.loaded:
            state.model.to(getattr(torch, self.dtype))
        else:
            state.load(dtype=self.dtype)
        return {"dtype": self.dtype}
