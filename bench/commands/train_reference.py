"""``infermatrix train-reference``: re-create the built-in model (corpus, tokenizer, weights)."""

from __future__ import annotations

import argparse
import dataclasses

from bench.commands import check_thread_count, folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    from optimize.reference.train import TrainConfig

    p.add_argument("--out", type=folder("--out"), required=True,
                   help="output model directory, new or empty; it appears only when complete")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "version":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
                       help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--stdlib-root", default="", help="read the corpus from this directory instead of the stdlib")


def main(args: argparse.Namespace) -> int:
    import json

    from optimize.reference.corpus import CorpusConfig
    from optimize.reference.train import TrainConfig, train_reference

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    config = TrainConfig(**overrides)
    check_thread_count(config.threads, "--threads")  # more would only contend, and slow the training
    summary = train_reference(args.out, config, CorpusConfig(root=args.stdlib_root))
    summary.pop("log")
    print(json.dumps(summary, indent=1))
    return 0
