"""``infermatrix variants``: the built-in variants, their steps and where they apply."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    from optimize.registry import variants

    infos = variants()
    if args.json:
        print(json.dumps({n: {"recipe": v.recipe.to_dict(), "description": v.recipe.description,
                              "applies": v.applies} for n, v in infos.items()}, indent=1))
        return 0
    from rich.markup import escape
    from rich.table import Table

    from bench.progress import console

    table = Table(title="built-in variants")
    for col in ("name", "steps", "what it does", "applies on"):
        table.add_column(col)
    for name, info in infos.items():
        steps = " -> ".join(s.technique for s in info.recipe.steps) or "(reference)"
        table.add_row(*(escape(text) for text in (name, steps, info.recipe.description, info.applies)))
    console(width=160).print(table)
    return 0
