"""An independent timing of one generate call, to check the harness against.

Loads the model with plain transformers in this process and times ``generate`` from the
outside with ``time.perf_counter``: TTFT is the wall time of a one-token call; the decode
rate is (N - 1) tokens over the extra time an N-token call takes. Same prompt source as
the harness (the evaluation text at the same seeded offset).

    python ci/benchmarks/direct_generate.py --model synthetic:llama-134m --prompt-tokens 128 --new-tokens 32

``--onnx-dir DIR`` times an exported graph instead (a directory holding ``model.onnx`` and its
config, e.g. a stored ``onnx-fp32`` artifact), loaded with optimum's ``ORTModelForCausalLM`` on
ONNX Runtime's CPU provider with its KV cache.

``--static-kv`` times the static-KV variant's decode instead: the same plain model, decoded by
the project's static-cache loop (``optimize.decode``) with its one-token step compiled
(``torch.compile``, default mode), timed from the outside like the rest; the warm-up calls
compile it.

``--serve`` measures one window per line read from stdin, until stdin closes, each in a child
forked from this process after it has imported the libraries and done nothing else: the child
loads the model, warms up and times ``--reps`` calls, prints the window's JSON line and
exits, as the harness's cells start from its fork server. A caller then takes windows between
measurements of its own seconds apart instead of an interpreter start apart, and every window
runs in a process as young as a harness cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:llama-134m")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="untimed N-token calls before the timed ones")
    p.add_argument("--threads", type=int, default=0,
                   help="torch's (and ONNX Runtime's) intra-op threads (0: each library's default)")
    p.add_argument("--onnx-dir", help="time this exported ONNX graph (model.onnx + config) with ONNX Runtime")
    p.add_argument("--static-kv", action="store_true",
                   help="decode with the static-KV variant's loop and compiled one-token step")
    p.add_argument("--serve", action="store_true",
                   help="measure one window per line read from stdin, each in a freshly forked child")
    args = p.parse_args()

    # What every window needs, imported once here, before any fork: what the harness's fork server
    # imports (bench.preload), so that neither side's windows pay for imports the other's do not.
    import torch  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import bench.prompts  # noqa: F401
    import optimize.models  # noqa: F401

    if not args.serve:
        print(json.dumps(_measure(args)))
        return
    if args.onnx_dir:
        import optimum.onnxruntime  # noqa: F401  (a plain measurement imports it after its RSS baseline)
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                print(json.dumps(_measure(args)), flush=True)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            sys.exit(f"a window's process ended with wait status {status}")


def _measure(args) -> dict:
    """Load the model, warm up, and time one window of calls."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from bench.prompts import prompt_ids
    from optimize.models import resolve_model

    ref = resolve_model(args.model)
    baseline_rss = _status_bytes("VmRSS")  # after the imports, before the load
    if args.onnx_dir:
        import onnxruntime
        from optimum.onnxruntime import ORTModelForCausalLM

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads  # 0: ONNX Runtime's default, one per physical core
        model = ORTModelForCausalLM.from_pretrained(args.onnx_dir, file_name="model.onnx", use_cache=True,
                                                    provider="CPUExecutionProvider", session_options=options)
    else:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
    ids, _ = prompt_ids(ref, model.config.vocab_size, args.batch_size, args.prompt_tokens)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    decoder = None
    if args.static_kv:
        from optimize.decode import StaticDecoder
        from optimize.kvcache import decode_step_compile_config

        decoder = StaticDecoder(decode_step_compile_config("default"))

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        if decoder is not None:
            decoder.generate(model, ids, n)
        else:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        timed(args.new_tokens)
    return _window(args, timed, baseline_rss)


def _window(args, timed, baseline_rss: int | None) -> dict:
    """``args.reps`` one-token and N-token calls, interleaved, and what they measured."""
    import torch

    # One-token and N-token calls interleaved in pairs, so a busy spell of a neighbour process
    # falls on both kinds alike instead of on one block of them.
    one, full = [], []
    for _ in range(args.reps):
        one.append(timed(1))
        full.append(timed(args.new_tokens))
    ttft_s, e2e_s = statistics.median(one), statistics.median(full)
    decode = args.batch_size * (args.new_tokens - 1)
    return {
        "model": args.model, "onnx_dir": args.onnx_dir, "static_kv": args.static_kv, "batch_size": args.batch_size,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "reps": args.reps, "torch_threads": torch.get_num_threads(),
        "ttft_ms": round(ttft_s * 1e3, 2), "e2e_ms": round(e2e_s * 1e3, 2),
        "decode_tokens_per_s": round(decode / (e2e_s - ttft_s), 2),
        # Interference only ever adds time: the minima estimate the uncontended cost.
        "ttft_ms_min": round(min(one) * 1e3, 3), "e2e_ms_min": round(min(full) * 1e3, 3),
        "decode_tokens_per_s_from_min": round(decode / (min(full) - min(one)), 2),
        "samples": {"ttft_ms": [round(x * 1e3, 3) for x in one], "e2e_ms": [round(x * 1e3, 3) for x in full]},
        # Memory as the kernel counts it for this process: resident set before the load, and its peak
        # (VmHWM) over load and generation.
        "rss_baseline_bytes": baseline_rss, "peak_rss_bytes": _status_bytes("VmHWM"),
    }


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    main()
