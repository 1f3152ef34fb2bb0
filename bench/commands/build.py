"""``infermatrix build``: build variants into the store, without benchmarking them."""

from __future__ import annotations

import argparse
import json

from bench.commands.run import _list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:pycode", help="model spec (default: builtin:pycode)")
    p.add_argument("--variants", type=_list, required=True, help="variant names, comma-separated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="target device")
    p.add_argument("--cache-dir", help="variant store (default: $INFERMATRIX_CACHE or ~/.cache/infermatrix)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code to run")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from optimize.errors import NotApplicable
    from optimize.models import resolve_device, resolve_model
    from optimize.registry import builtin_variant
    from optimize.store import VariantStore

    recipes = [builtin_variant(v) for v in args.variants]
    device = resolve_device(args.device)
    cache = Path(args.cache_dir) if args.cache_dir else None
    ref = resolve_model(args.model, cache)
    store = VariantStore(cache)
    failed = False
    for recipe in recipes:
        try:
            art = store.get_or_build(ref, recipe, device, args.trust_remote_code)
        except NotApplicable as exc:
            print(json.dumps({"variant": recipe.name, "status": "skipped", "reason": str(exc)}))
            continue
        except Exception as exc:  # report and go on with the other variants
            failed = True
            print(json.dumps({"variant": recipe.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}))
            continue
        print(json.dumps({"variant": recipe.name, "status": "ok", "path": str(art.path), "reused": art.reused,
                          "runtime_steps": [s.technique for s in recipe.runtime_steps],
                          "artifact_bytes": art.manifest.get("artifact_bytes"),
                          "reports": art.manifest.get("reports", [])}))
    return 1 if failed else 0
