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
    preallocates the cache so shapes never change; with ``compile`` only the one-token
    decode step is compiled (gpt-fast's split: the prefill stays eager), with
    ``fullgraph=True`` so a graph break is an error rather than a silent slow path, and with
    ``compile_mode="reduce-overhead"`` that step is replayed as a CUDA graph on a GPU. The
    generate scenario times the compiling call apart (``timing_s.compile_and_capture``).
    ``quantized`` stores keys and values in ``nbits`` through transformers' quantized cache
    (optimum-quanto backend).
    """

    technique = "kv-cache"
    stage = "runtime"
    backend = "torch"
    summary = "choose the KV cache: none, dynamic, static (+compile) or quantized"
    changes_kv_cache = True
    mode: str = "dynamic"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode of the decode step; "reduce-overhead" uses CUDA graphs on GPU
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
                from optimize.decode import StaticDecoder

                # generate() is not called for this variant: the decoder holds the compile settings (and
                # checks, at its first call, that the model declares a forward compilable as one graph)
                state.decoder = StaticDecoder(decode_step_compile_config(self.compile_mode))
                state.labels.append(f"decode step compiled (torch.compile mode={self.compile_mode}, fullgraph); "
                                    "prefill eager; greedy decode loop of its own (no per-token sync); "
                                    "compile and capture timed apart")
            else:
                # transformers would compile a static cache's decode step on CUDA by itself: eager means eager.
                state.generate_kwargs["disable_compile"] = True
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


def decode_step_compile_config(mode: str):
    """Transformers' compile settings (``CompileConfig``) for the one-token decode step, not the prefill.

    Compiling the whole forward instead (prefill shapes included, with CUDA graphs) is what
    crashed with SIGSEGV on an H200; the decode loop (``optimize.decode``) calls the compiled
    step only for decode, where every call has the same shapes against the static cache.
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers compiles only on CUDA unless told otherwise (CPU tests)
    return config
