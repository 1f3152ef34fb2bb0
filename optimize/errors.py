"""Project exceptions. The CLI turns ``InputError`` into one line and exit code 2."""


class InputError(ValueError):
    """Bad user input: names the parameter, the value and what is allowed."""


class RecipeError(InputError):
    """A recipe or technique configuration is invalid."""


class NotApplicable(Exception):
    """A technique cannot run on this device or model; the reason is one line.

    Cells that hit it are recorded as ``status: "skipped"`` with the reason, never as a
    silent fallback.
    """


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut (a cut message must not
    read as whole: "set 'HF_HUB_OFFLINE" was the end of one).
    """
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + "\u2026"


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it); the type alone for an empty one."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {clip(lines[0], limit)}" if lines else type(exc).__name__
