"""``infermatrix build``: build variants into the store and validate them, without benchmarking.

A variant's answer never depends on what the store holds. The store keys an artifact by a
recipe's saved steps only, so ``prune-2of4-fp16`` reuses ``prune-2of4``'s artifact; its
runtime steps (the fp16 cast) are applied whenever the variant is loaded, so they are applied
here on a reused artifact too, as a ``run`` cell would, and one that cannot run on this device
makes the variant ``skipped`` every time, not only when the artifact is built.

What the libraries print while building (torchao's "Failed to load ..." lines, torch's
warnings) goes to ``build.log`` in the cache directory, never to the console, as ``run``
sends it to each job's log; the console shows one JSON line per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.commands import folder, names, nonempty
from bench.commands.run import _fetch_hub_models, check_cache_dirs

if TYPE_CHECKING:
    from optimize.recipe import Recipe

BUILD_LOG = "build.log"  # in the cache directory, beside the fork server's preload.log


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=nonempty("--model"), default="builtin:pycode",
                   help="model spec (default: builtin:pycode)")
    p.add_argument("--variants", type=names("--variants", "variant"), required=True,
                   help="variant names, comma-separated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="target device")
    p.add_argument("--cache-dir", type=folder("--cache-dir", str),
                   help="variant store (default: $INFERMATRIX_CACHE or ~/.cache/infermatrix)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code to run")


def main(args: argparse.Namespace) -> int:
    from optimize.models import check_model_spec, default_cache_dir, resolve_device
    from optimize.registry import builtin_variant

    check_model_spec(args.model)
    recipes = [builtin_variant(v) for v in args.variants]  # never empty: '--variants ""' is refused by its type
    check_cache_dirs(args.cache_dir, fork_server=False)  # build starts no fork server
    _fetch_hub_models([args.model])  # an unreachable hub id is bad input, as for run
    log = (Path(args.cache_dir) if args.cache_dir else default_cache_dir()) / BUILD_LOG
    with output_to(log):
        device = resolve_device(args.device)  # imports torch
    failed = False
    for recipe in recipes:
        job = {"model": args.model, "variant": recipe.to_dict(), "device": device,
               "trust_remote_code": args.trust_remote_code, "cache_dir": args.cache_dir}
        with output_to(log, f"build {recipe.name} of {args.model} on {device}"):
            result = build_variant(job)
        manifest = result.pop("manifest", {}) or {}
        result.update(variant=recipe.name, runtime_steps=[s.technique for s in recipe.runtime_steps],
                      artifact_bytes=manifest.get("artifact_bytes"), reports=manifest.get("reports", []),
                      log=str(log))
        failed |= result["status"] == "failed"
        print(json.dumps(result, default=str), flush=True)
    return 1 if failed else 0


def build_variant(job: dict[str, Any]) -> dict[str, Any]:
    """``bench.cell.build`` (the build job ``run`` starts), then the runtime steps on a reused artifact.

    The build validates the artifact, which is keyed by the saved steps alone (``prune-2of4``
    and ``prune-2of4-fp16`` share one); the runtime steps are applied here, as a ``run`` cell
    applies them when it loads the variant: a step that cannot run on this device gives the
    same ``skipped`` answer whether the artifact was built now or reused.
    """
    from bench.cell import build
    from optimize.registry import recipe_from_dict

    t0 = time.perf_counter()
    result = build(job)
    recipe = recipe_from_dict(job["variant"])
    if result["status"] == "ok" and recipe.runtime_steps:
        refusal = _runtime_refusal(job, recipe)
        if refusal is not None:
            return {**refusal, "build_s": time.perf_counter() - t0}  # as a build whose validation refused
    return result


def _runtime_refusal(job: dict[str, Any], recipe: Recipe) -> dict[str, Any] | None:
    """Why the job's variant cannot be loaded with its runtime steps (status and error), or None when it can."""
    from bench.cell import _cache, build_outcome
    from optimize.models import resolve_model
    from optimize.store import VariantStore, load_variant

    try:
        ref = resolve_model(job["model"], _cache(job), job.get("tokenizer"))
        load_variant(ref, recipe, job["device"], VariantStore(_cache(job)), job["trust_remote_code"])
    except Exception as exc:  # the outcomes and errors of bench.cell.build, for the same causes
        return build_outcome(exc)
    return None


@contextlib.contextmanager
def output_to(log: Path, heading: str | None = None):
    """Send this process's stdout and stderr to ``log`` (appended) while the block runs.

    As a job's process does for ``run`` (``bench.runner._child``), file descriptors 1 and 2
    are pointed at the log, so what C extensions and logging handlers write lands there.
    ``sys.stdout``/``sys.stderr`` are swapped for streams on those descriptors too, in case
    they were replaced (a test's capture): those streams never close their descriptor, so a
    handler created in the block and keeping one writes where fd 2 points afterwards, as it
    would have with the original ``sys.stderr``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if heading:
            os.write(fd, f"== {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {heading}\n".encode())
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        streams = [open(n, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False) for n in (1, 2)]
        try:
            with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
                yield
        finally:
            for stream in (*streams, sys.stdout, sys.stderr):  # the originals too: a handler may hold them
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    finally:
        for n in (fd, *saved):
            os.close(n)
