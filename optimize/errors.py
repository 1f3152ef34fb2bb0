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


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it); the type alone for an empty one."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
