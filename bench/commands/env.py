"""``infermatrix env``: print the environment record that every run stores."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-torch", action="store_true", help="skip importing torch (faster, fewer fields)")


def main(args: argparse.Namespace) -> int:
    from bench.env import environment

    print(json.dumps(environment(with_torch=not args.no_torch), indent=1, sort_keys=True))
    return 0
