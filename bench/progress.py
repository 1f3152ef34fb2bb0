"""Progress for long runs: a rich bar with ETA, or plain lines with ``--quiet``.

The bar redraws only when a job finishes (no refresh thread), so the parent stays idle
while a cell is being measured. Lines are printed without rich markup: they carry error
text, paths and package names (``pip install 'infermatrix[gpu]'``), whose brackets rich
would otherwise take for style tags and drop.
"""

from __future__ import annotations

import errno
import functools
import re
import sys
from typing import Any

from optimize.errors import clip

EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Fault)\b")
PARENT_MESSAGES = ("timed out after", "cell process died", "cell process exited")


def error_cause(error: str | None) -> str:
    """The line of an error that says what went wrong.

    A traceback (or the last lines of one: cells keep a tail) ends with the exception's own
    line; the parent's messages ("cell process died with signal ...", followed by the log's
    tail) say it in their first line. A "build: " prefix is kept.
    """
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return ""
    prefix = "build: " if lines[0].startswith("build: ") else ""
    head = lines[0].removeprefix(prefix)
    if head.startswith(PARENT_MESSAGES):
        return lines[0]
    frames = [i for i, line in enumerate(lines) if line.startswith('File "')]
    # The exception's own line follows the last frame (and its source and caret lines); a message of
    # several lines ("ValueError: ... \n\nYou can update Transformers ...") continues after it.
    after = lines[frames[-1] + 1 :] if frames else lines
    own = next((line for line in after if EXCEPTION_LINE.match(line.removeprefix(prefix))), None)
    if own is not None:
        return own if own.startswith(prefix) else prefix + own
    if frames or "Traceback" in head:
        return prefix + lines[-1].removeprefix(prefix)
    return lines[0]


def console(**kwargs):
    """A rich Console whose lost reader (``| head``) raises BrokenPipeError, which the command turns into
    exit 141; rich's own handling exits 1, the code of a failed check.
    """
    return _console_class()(**kwargs)


@functools.cache
def _console_class():
    """The Console subclass, made once (rich is imported only by the commands that print tables)."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more to write: its buffer would raise again at exit
            raise BrokenPipeError(errno.EPIPE, "the reader of the output closed it")

    return PipeConsole


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     auto_refresh=False, transient=False, console=console())
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.stop()

    def _say(self, text: str) -> None:
        if self._bar:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "plan":
            refs = info.get("references", 0)
            self._say(f"{_count(info['cells'], 'cell')} ({info['done']} already done), "
                      f"{_count(info['builds'], 'variant build')} to make"
                      + (f", {_count(refs, 'drift reference pass', 'drift reference passes')}" if refs else ""))
            if self._bar:
                self._task = self._bar.add_task("cells", total=info["todo"] + info["builds"] + refs)
        elif kind == "build":
            how = "reused" if info.get("reused") else f"built in {info.get('build_s') or 0:.1f} s"
            self._say(f"build {info['variant']}: {info['status']}" + (f" ({how})" if info["status"] == "ok" else ""))
        elif kind == "roofline":
            if "error" in info:
                self._say(f"roofline {info['device']}: failed ({clip(error_cause(info['error']), 200)})")
            else:
                self._say(f"roofline {info['device']}: copy {info['bandwidth_gbps']:.1f} GB/s, "
                          f"fp32 matmul {info['tflops'] * 1e3:.0f} GFLOP/s")
        elif kind == "reference":
            ok = info["status"] == "ok"
            detail = f"{info.get('reference_s') or 0:.1f} s" if ok else clip(error_cause(info.get("error")), 200)
            self._say(f"drift reference pass {info['model']}: {info['status']} ({detail})")
        elif kind == "cell":
            s = info["scenario"]
            tps = info.get("metrics", {}).get("decode_tokens_per_s")
            extra = f" decode {tps:.1f} tok/s" if tps else ""
            cause = error_cause(info.get("error"))
            which = f" round {info['round'] + 1}" if isinstance(info.get("round"), int) else ""  # [measure] rounds
            self._say(f"{info['variant']} b{s['batch_size']} p{s['prompt_tokens']} n{s['new_tokens']} "
                      f"{info['device']}{which}: {info['status']}{extra}" + (f" ({clip(cause, 160)})" if cause else ""))
        counted = info.get("counted", True)
        if self._bar and self._task is not None and counted and kind in ("build", "reference", "cell"):
            self._bar.advance(self._task)
            self._bar.refresh()


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
