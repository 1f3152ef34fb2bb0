"""What every scenario shares: its settings, its record form and how it is run.

A scenario is a frozen dataclass whose fields are its grid settings (what a matrix's
``[[scenarios]]`` table may list); settings the kind fixes are class constants named in
``FIXED`` and recorded with the cell, never set by a matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from bench.metrics.timing import MAX_COUNT


@dataclass(frozen=True)
class Footprint:
    """Sizes of the loaded variant a scenario may need (decode's memory estimate, roofline bytes)."""

    weights_bytes: int
    kv_bytes_per_token: float


# The largest count a scenario setting may hold (MAX_COUNT): torch and tokenizers index tokens with 32-bit
# integers (and run.json's integers must stay within 64 bits, which a TOML or --flag value need not).


def check_count(what: str, key: str, value: int, least: int = 1) -> None:
    """``InputError`` unless ``least <= value <= MAX_COUNT`` ("scenario prompt_tokens must be >= 1, got 0")."""
    from optimize.errors import InputError

    if value < least:
        raise InputError(f"{what} {key} must be >= {least}, got {value}")
    if value > MAX_COUNT:
        raise InputError(f"{what} {key} must be at most {MAX_COUNT} (a 32-bit count), got {value}")


class Scenario:
    """Mixed into each scenario dataclass; ``name`` and ``FIXED`` are class constants."""

    name: ClassVar[str]
    FIXED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings(cls) -> list[str]:
        """The grid settings, in the stable order matrices and records use."""
        return sorted(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The record form: name, grid settings and fixed settings (``cell_id`` hashes it)."""
        return {"name": self.name, **{k: getattr(self, k) for k in (*self.settings(), *self.FIXED)}}

    def validate(self) -> None:
        raise NotImplementedError

    def run(self, state, prompts, repeat, footprint: Footprint | None = None) -> tuple[dict, dict, dict]:
        """Time the workload on a loaded variant: (metrics, samples, method)."""
        raise NotImplementedError
