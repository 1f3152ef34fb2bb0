"""``infermatrix build``: build variants into the store and validate them, without benchmarking."""

from __future__ import annotations

import argparse
import json

from bench.commands.run import _fetch_hub_models, _list, check_cache_dirs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:pycode", help="model spec (default: builtin:pycode)")
    p.add_argument("--variants", type=_list, required=True, help="variant names, comma-separated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="target device")
    p.add_argument("--cache-dir", help="variant store (default: $INFERMATRIX_CACHE or ~/.cache/infermatrix)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code to run")


def main(args: argparse.Namespace) -> int:
    from bench.cell import build
    from optimize.errors import InputError
    from optimize.models import check_model_spec, resolve_device
    from optimize.registry import builtin_variant

    check_model_spec(args.model)
    recipes = [builtin_variant(v) for v in args.variants]
    if not recipes:
        raise InputError("--variants names no variant")
    check_cache_dirs(args.cache_dir, fork_server=False)  # build starts no fork server
    _fetch_hub_models([args.model])  # an unreachable hub id is bad input, as for run
    device = resolve_device(args.device)
    failed = False
    for recipe in recipes:
        result = build({"model": args.model, "variant": recipe.to_dict(), "device": device,
                        "trust_remote_code": args.trust_remote_code, "cache_dir": args.cache_dir})
        manifest = result.pop("manifest", {}) or {}
        result.update(variant=recipe.name, runtime_steps=[s.technique for s in recipe.runtime_steps],
                      artifact_bytes=manifest.get("artifact_bytes"), reports=manifest.get("reports", []))
        failed |= result["status"] == "failed"
        print(json.dumps(result, default=str))
    return 1 if failed else 0
