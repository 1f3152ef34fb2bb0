"""The CLI's subcommands, each a thin add_arguments()/main() pair over library calls."""

from __future__ import annotations

import sys
from pathlib import Path


def emit(text: str, out: Path | None) -> None:
    """Write a command's text output to ``out`` (its folder created), or to stdout without one."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    else:
        sys.stdout.write(text)
