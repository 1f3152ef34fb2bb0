"""Where a variant's decode time goes: milliseconds per token, and torch.profiler's busiest operators.

Usage: ``python ci/decode_profile.py MATRIX MODEL VARIANT [VARIANT ...] [--device cuda] [--new-tokens N]``.
Variants are the matrix's recipes or built-in names. For each: the variant is loaded as a
cell loads it, three calls warm it up (a compiled step compiles and captures there; the first
call's time is printed at once, for a variant too slow to finish), then the decode cost per
token is the difference of two timed calls, ``new_tokens + 2`` and ``2`` tokens, each the
fastest of three (on CUDA, synchronised), divided by ``new_tokens``; then one call is profiled
and its operators printed, by self CPU time (host work per token) and, on CUDA, by device time.
``ci/gpu-check`` runs it when ``GPU_CHECK_PROFILE=1``.
"""

from __future__ import annotations

import argparse
import time

from bench.generation import greedy_generate
from bench.matrix import load_matrix
from bench.prompts import prompt_ids
from optimize.models import default_cache_dir, resolve_model
from optimize.store import VariantStore, load_variant

ROWS = 15


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _fastest_call_ms(state, prompts, new_tokens: int, calls: int = 3) -> float:
    best = float("inf")
    for _ in range(calls):
        _sync(state.device)
        t0 = time.perf_counter()
        greedy_generate(state, prompts, new_tokens)
        _sync(state.device)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def profile(state, prompts, new_tokens: int) -> str:
    """Per-token cost and the profiler's tables for one variant, as text."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    first = _fastest_call_ms(state, prompts, new_tokens + 2, calls=1)  # printed now: a slow variant may not finish
    print(f"first call of {new_tokens + 2} tokens (cold): {first:.1f} ms", flush=True)
    for _ in range(2):
        greedy_generate(state, prompts, new_tokens + 2)
    short, long = _fastest_call_ms(state, prompts, 2), _fastest_call_ms(state, prompts, new_tokens + 2)
    per_token = (long - short) / new_tokens
    lines = [f"decode: {per_token:.3f} ms/token ({1e3 / per_token:.1f} tok/s at batch {prompts.shape[0]}); "
             f"call of 2 tokens {short:.1f} ms, of {new_tokens + 2} tokens {long:.1f} ms"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if state.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        greedy_generate(state, prompts, new_tokens + 2)
        _sync(state.device)
    events = prof.key_averages()
    lines += ["", f"by self CPU time (one call, {new_tokens + 2} tokens):",
              events.table(sort_by="self_cpu_time_total", row_limit=ROWS)]
    if state.device == "cuda":
        lines += ["by device time:", events.table(sort_by="self_device_time_total", row_limit=ROWS)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix")
    parser.add_argument("model")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    matrix = load_matrix(args.matrix)
    cache = default_cache_dir()
    ref = resolve_model(args.model, cache)
    for name in args.variants:
        state, _ = load_variant(ref, matrix.recipe(name), args.device, VariantStore(cache))
        prompts, _ = prompt_ids(ref, state.model.config.vocab_size, 1, args.prompt_tokens)
        print(f"===== {args.model} {name} on {args.device}, prompt {args.prompt_tokens}", flush=True)
        print(profile(state, prompts, args.new_tokens), flush=True)
        del state
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
