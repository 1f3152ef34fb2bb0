"""The CLI's subcommands, each a thin add_arguments()/main() pair over library calls.

Outputs are checked before any work (``output_file``, ``output_dir``): a run's own files are
never an output, and a path that cannot be written is bad input (exit 2), not a traceback
after the work is done.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from optimize.atomic import folder_problem
from optimize.errors import InputError
from optimize.registry import first_repeat

__all__ = ["check_thread_count", "folder", "folder_problem", "names", "nonempty", "output_dir", "output_file",
           "write_output"]


def check_thread_count(threads: int, flag: str) -> None:
    """Refuse more threads than the CPUs this process may run on (its affinity): they would only contend."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads and usable and threads > usable:
        raise InputError(f"threads must be at most the {usable} CPUs this process may run on, got {threads} "
                         f"({flag}; 0 leaves it to torch)")


def names(flag: str, what: str):
    """A comma list of names; an empty one is refused, never taken as the flag left out, and so is an
    empty name in it (``fp32,,``: a name left out, or a stray comma; never dropped in silence).
    """
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",")]
        if not any(values):
            raise argparse.ArgumentTypeError(f"{flag} names no {what}, got {text!r}")
        if not all(values):
            raise argparse.ArgumentTypeError(f"{flag} has an empty {what} name in {text!r} (a comma too many, "
                                             "or a name left out)")
        twice = first_repeat(values)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{flag} names {what} {twice!r} twice in {text!r}")
        return values
    return parse


def nonempty(flag: str, convert=str):
    """A string or path flag's value; an empty one is refused, never taken as the flag left out
    (``Path("")`` is the working directory).
    """
    def parse(text: str):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must not be empty, got {text!r}")
        return convert(text)
    return parse



def folder(flag: str, convert=Path):
    """A folder flag's value: not empty, and not ``-``, which stands for standard output where one
    text output is written and cannot be a folder (it would be a folder named "-" in the working one).
    """
    parse_nonempty = nonempty(flag, convert)

    def parse(text: str):
        if text.strip() == "-":
            raise argparse.ArgumentTypeError(f"{flag} is a folder, and '-' means standard output, which a folder "
                                             "cannot be (write ./- for a folder of that name)")
        return parse_nonempty(text)
    return parse


def output_file(path: Path | None, what: str = "--out", stdout: bool = False) -> Path | None:
    """``path`` if a file can be written there; else an ``InputError`` naming it. Checked before any work.

    Refused: a run directory's own files (``run.json``, ``results.jsonl`` and its torn lines), a
    directory, a file that cannot be written, a folder where nothing can be created. A device or
    pipe (``/dev/stdout``) is taken as it is. ``-`` is standard output where the setting writes
    text (``stdout``), and refused elsewhere rather than taken as a file named "-".
    """
    if path is not None and str(path) == "-":
        if stdout:
            return path
        raise InputError(f"{what} -: this setting writes a file, not standard output; give a path")
    if path is None:
        return path
    from bench.results import RESULTS, RUN, TORN

    if path.name in (RESULTS, RUN, TORN) and (path.parent / RUN).is_file():
        raise InputError(f"{what} {path}: that is the run's own {path.name}; give another file")
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        raise InputError(f"{what} {path}: {exc.strerror}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a directory; give a file")
    if mode is not None and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path}: cannot write it (permission denied)")
    problem = folder_problem(path.parent) if mode is None or stat.S_ISREG(mode) else None
    if problem:
        raise InputError(f"{what} {path}: its folder {path.parent} {problem}")
    return path


def output_dir(path: Path, what: str = "--out") -> Path:
    """``path`` if files can be written into it (created when missing, nothing created here); else an
    ``InputError`` naming the setting, the path and why.
    """
    problem = folder_problem(path)
    if problem:
        raise InputError(f"{what} {path} {problem}")
    return path


def write_output(path: Path, data: str | bytes, what: str = "--out") -> None:
    """Write ``data`` to ``path`` whole (a regular file: a temporary sibling renamed over it; a device or
    pipe: directly); a failure to write is an ``InputError`` naming the path.
    """
    from optimize.atomic import write_file

    try:
        write_file(path, data)
    except OSError as exc:
        raise InputError(f"{what} {path}: could not write it ({exc.strerror or exc})") from None


def emit(text: str, out: Path | None) -> None:
    """Write a command's text output to ``out`` (its folder created), or to stdout without one or with ``-``."""
    if out and str(out) != "-":
        write_output(out, text)
    else:
        sys.stdout.write(text)
