"""The ``infermatrix`` command: subcommands are thin add_arguments()/main() pairs.

Exit codes: 0 success, 1 a check failed (a cell failed, a gate tripped), 2 bad usage or
input, 3 an internal error (a bug: its traceback follows); 141 when the reader of the output
closed it (``| head``); 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP, each after the command's
clean-up (a running cell's process group killed). Heavy libraries are imported by
the subcommand that needs them, never here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from optimize.errors import InputError, exception_line

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

# name: (module, one-line help)
COMMANDS = {
    "run": ("bench.commands.run", "run a benchmark matrix (the built-in default with no argument)"),
    "build": ("bench.commands.build", "build variants into the store without benchmarking them"),
    "report": ("bench.commands.report", "comparison reports of a run directory: Markdown, HTML, CSV, JSON, PNG"),
    "select": ("bench.commands.select", "choose the variant to deploy under constraints, with reasons"),
    "export": ("bench.commands.export", "export a run for pytest-benchmark or github-action-benchmark"),
    "merge": ("bench.commands.merge", "combine shard runs of one matrix into one run directory"),
    "variants": ("bench.commands.variants", "list the built-in variants, what each does and where it applies"),
    "compare": ("bench.commands.compare", "regression gate: compare two run directories cell by cell"),
    "ab": ("bench.commands.ab", "regression gate: run two git revisions interleaved in one job and compare them"),
    "history": ("bench.commands.history", "record runs' key metrics per commit in SQLite and show them"),
    "env": ("bench.commands.env", "print the environment record"),
    "train-reference": ("bench.commands.train_reference", "re-create the built-in reference model from scratch"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the cause, and where the usage is) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="infermatrix", description="LLM inference optimization and benchmarking harness.")
    from bench import __version__

    p.add_argument("--version", action="version", version=f"infermatrix {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return p


def one_line(message: object) -> str:
    """``message`` as one line: a line break inside it (a path may hold one) is written as its escape."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def _one_line_warnings() -> None:
    """The project's own warnings (corrupt records, rebuilt artifacts) as one plain line each, and each text
    once per command (a report in four formats reads the records four times; it warns once).
    """
    plain = warnings.formatwarning
    if not getattr(plain, "infermatrix", False):
        def fmt(message, category, filename, lineno, line=None):
            if category.__module__.split(".")[0] in ("bench", "optimize"):
                return f"infermatrix: warning: {one_line(message)}\n"
            return plain(message, category, filename, lineno, line)

        fmt.infermatrix = True
        warnings.formatwarning = fmt
    show, seen = warnings.showwarning, set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] in ("bench", "optimize"):
            if (category, str(message)) in seen:
                return
            seen.add((category, str(message)))
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its subcommand ('infermatrix compare: error: ...'), not the top level."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a CI job cancelled, a terminal closed), raised in the main thread as Ctrl-C's
    KeyboardInterrupt is, so the same clean-up runs: the running cell's process group is killed and
    every finished record kept, rather than the command vanishing mid-cell.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def _catch_termination() -> dict[int, object]:
    """Turn SIGTERM and SIGHUP into ``Terminated`` where they would end the process outright; the handlers
    replaced, to put back when the command returns (a caller in this process keeps its own).
    """
    replaced = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, _raise_terminated)
        except ValueError:  # not the main thread: signals are not this thread's to handle
            break
    return replaced


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    replaced = _catch_termination()
    try:
        with warnings.catch_warnings():  # the command's warning display, undone when it returns
            _one_line_warnings()
            return _run(args)
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except InputError as exc:
        print(f"infermatrix {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output closed it (`| head`): not a bug. Python's advice: point stdout at devnull,
        # so flushing it at exit raises nothing more; 141 is the shell's status for a writer killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        from bench.results import RunWriteError

        if not isinstance(exc, RunWriteError):
            return _internal_error(exc)
        kept = "; the records written before it are intact" if args.command in ("run", "ab") else ""
        print(f"infermatrix {args.command}: error: {one_line(exc)}{kept}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        kept = "; finished cells are in the run directory" if args.command in ("run", "ab") else ""
        if isinstance(exc, Terminated):
            print(f"infermatrix: terminated by {signal.Signals(exc.signum).name}{kept}", file=sys.stderr)
            return 128 + exc.signum
        print(f"infermatrix: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as exc:
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    """A bug: its cause in one line, then its traceback; exit 3, never 1, which reads as a failed check."""
    import traceback

    print(f"infermatrix: internal error: {exception_line(exc)}", file=sys.stderr)  # the traceback has the rest
    traceback.print_exception(exc, file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
