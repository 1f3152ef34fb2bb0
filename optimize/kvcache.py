"""KV-cache variants: none, dynamic (the default), static with torch.compile, quantized."""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

MODES = ("dynamic", "none", "static", "quantized")


@register
@dataclass(frozen=True)
class KVCache(Step):
    """How generation caches keys and values.

    ``none`` recomputes the whole prefix at every step (what caching buys); ``static``
    preallocates the cache so shapes never change, which lets ``torch.compile`` specialise
    the decode step (the first calls compile: that time is reported as warm-up, apart from
    steady-state latency); ``quantized`` stores keys and values in ``nbits`` through
    transformers' quantized cache (optimum-quanto backend).
    """

    technique = "kv-cache"
    stage = "runtime"
    backend = "torch"
    summary = "choose the KV cache: none, dynamic, static (+compile) or quantized"
    mode: str = "dynamic"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" uses CUDA graphs on GPU
    nbits: int = 4
    residual_length: int = 128  # most recent tokens kept in full precision by the quantized cache

    def validate(self) -> None:
        if self.mode not in MODES:
            raise RecipeError(f"kv-cache.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "quantized" and self.nbits not in (2, 4):
            raise RecipeError(f"kv-cache.nbits must be 2 or 4 for the quanto backend, got {self.nbits}")
        if self.compile and self.mode != "static":
            raise RecipeError("kv-cache.compile needs mode = 'static' (dynamic shapes would recompile every step)")

    def is_lossless(self) -> bool:
        return self.mode != "quantized"

    def apply(self, state) -> dict:
        if self.mode == "none":
            state.generate_kwargs["use_cache"] = False
        elif self.mode == "static":
            state.generate_kwargs["cache_implementation"] = "static"
            if self.compile:
                import torch

                state.model.forward = torch.compile(state.model.forward, mode=self.compile_mode, fullgraph=False)
                state.labels.append(f"torch.compile({self.compile_mode}); compile time is in warm-up")
        elif self.mode == "quantized":
            try:
                import optimum.quanto  # noqa: F401
            except ImportError:
                raise NotApplicable("kv-int4 needs optimum-quanto (pip install optimum-quanto)") from None
            state.generate_kwargs["cache_implementation"] = "quantized"
            state.generate_kwargs["cache_config"] = {"backend": "quanto", "nbits": self.nbits,
                                                     "residual_length": self.residual_length}
            state.labels.append(f"KV cache int{self.nbits} (quanto), last {self.residual_length} tokens full precision")
        return {"mode": self.mode}
