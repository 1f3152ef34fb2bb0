"""Drift settings and budgets: the ``[drift]`` table's types, apart from the code that measures.

``bench.matrix`` parses these without importing the measurement (``bench.metrics.drift``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from optimize.errors import InputError

SCORINGS = ("auto", "full-window", "through-cache")
# Which tokens of a window are scored. "all-but-first": every token but the window's first (the
# default; more tokens, less context on average). "llama.cpp": llama-perplexity's protocol, the
# window's first token replaced by BOS where the tokenizer adds one and only its second half scored
# (each scored token sees at least context/2 earlier ones): perplexities comparable with its figures.
PROTOCOLS = ("all-but-first", "llama.cpp")
DEFAULT_PROTOCOL = PROTOCOLS[0]
RANDOM_WEIGHTS = ("score", "skip")


def random_weights_skip(random_weights: str, ref) -> str | None:
    """Why drift of the resolved model ``ref`` is skipped under ``[drift] random_weights`` (None: it is scored)."""
    if random_weights != "skip" or ref.trained:
        return None
    return (f"{ref.spec} has random weights and [drift] random_weights is \"skip\": its drift would test the "
            "mechanics only")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DriftConfig:
    """How drift is measured; the one place for its defaults."""

    context: int = 256  # window length in tokens
    max_tokens: int = 8192  # cap on evaluation tokens: the first max_tokens // context full windows
    batch_windows: int = 8  # windows per forward pass (memory: batch x context x vocab x 4 bytes)
    gen_prompts: int = 8  # fixed prompts for generation agreement
    gen_prompt_tokens: int = 32
    gen_new_tokens: int = 32
    enabled: bool = True
    # "full-window": one forward pass per window, no KV cache read; "through-cache": teacher-forced
    # decoding through the variant's own cache (bench/metrics/drift_incremental.py); "auto": through
    # the cache for variants with a step that changes the KV cache and keeps one.
    scoring: str = "auto"
    protocol: str = DEFAULT_PROTOCOL
    # "score": drift of a model with random weights (synthetic:*) is measured too, though it tests the
    # mechanics only; "skip": such a model's cells skip drift (and its reference pass), saying why.
    random_weights: str = "score"

    def validate(self) -> None:
        for key in ("context", "max_tokens", "batch_windows", "gen_prompts", "gen_prompt_tokens", "gen_new_tokens"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise InputError(f"drift {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.context < 2:
            raise InputError(f"drift context must be >= 2 so a window has a token to score, got {self.context}")
        if self.max_tokens < self.context:
            raise InputError(f"drift max_tokens must be >= context ({self.context}), got {self.max_tokens}")
        if not isinstance(self.enabled, bool):
            raise InputError(f"drift enabled must be true or false, got {self.enabled!r}")
        if self.scoring not in SCORINGS:
            raise InputError(f"drift scoring must be one of {', '.join(map(repr, SCORINGS))}, got {self.scoring!r}")
        if self.random_weights not in RANDOM_WEIGHTS:
            raise InputError(f"drift random_weights must be one of {', '.join(map(repr, RANDOM_WEIGHTS))}, "
                             f"got {self.random_weights!r}")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"drift protocol must be one of {', '.join(map(repr, PROTOCOLS))}, "
                             f"got {self.protocol!r}")
        if self.protocol == "llama.cpp" and self.context < 3:
            raise InputError(f"drift context must be >= 3 under the llama.cpp protocol so the second half of a "
                             f"window holds a token to score, got {self.context}")

    @property
    def windows(self) -> int:
        return self.max_tokens // self.context

    @property
    def first_scored_row(self) -> int:
        """Index of the first scored row of a window's (context - 1) next-token rows (row t predicts token t+1)."""
        return self.context // 2 if self.protocol == "llama.cpp" else 0

    def reference_settings(self) -> dict[str, Any]:
        """The settings that determine the reference's contents (not batching, ``enabled`` or ``scoring``).

        ``protocol`` is named only when it is not the default, so references cached before it
        existed keep their keys.
        """
        out: dict[str, Any] = {k: getattr(self, k) for k in ("context", "max_tokens", "gen_prompts",
                                                              "gen_prompt_tokens", "gen_new_tokens")}
        if self.protocol != DEFAULT_PROTOCOL:
            out["protocol"] = self.protocol
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DriftConfig:
        """Parse a ``[drift]`` table; unknown keys and bad values raise ``InputError`` naming them."""
        return _parse(cls, data, where, "drift setting")


def _parse(cls, data: Any, where: str, what: str):
    """``cls(**data)``, validated; unknown keys and bad values raise ``InputError`` naming them."""
    _reject_unknown(cls, data, where, what)
    obj = cls(**data)
    try:
        obj.validate()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return obj


def _reject_unknown(cls, data: Any, where: str, what: str) -> None:
    from optimize.registry import did_you_mean

    if not isinstance(data, dict):
        raise InputError(f"{where}: must be a table, got {data!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        key = unknown[0]
        raise InputError(f"{where}: '{key}' is not a {what}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class DriftBudget:
    """Limits on drift metrics; None means no limit. ``max_X``/``min_X`` bound the metric ``X``."""

    max_kld_mean: float | None = None
    max_kld_p99: float | None = None
    max_ppl_ratio: float | None = None
    min_top1_agreement: float | None = None
    min_gen_exact_match: float | None = None

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            fraction = f.name.startswith("min_")
            if not _is_number(value) or value < 0 or (fraction and value > 1) or not math.isfinite(value):
                allowed = "a fraction in [0, 1]" if fraction else "a non-negative number"
                raise InputError(f"drift budget {f.name} must be {allowed}, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DriftBudget:
        """Parse a budget table; unknown keys and bad values raise ``InputError`` naming them."""
        return _parse(cls, data, where, "drift budget limit")

    def check(self, metrics: dict[str, Any]) -> list[str]:
        """Human-readable violations of this budget by drift ``metrics``; empty when within it."""
        out = []
        for f in dataclasses.fields(self):
            limit = getattr(self, f.name)
            if limit is None:
                continue
            bound, metric = f.name.split("_", 1)
            value = metrics.get(metric)
            if not _is_number(value) or math.isnan(value):
                out.append(f"{metric} was not measured (budget {f.name} = {limit:g})")
            elif bound == "max" and value > limit:
                out.append(f"{metric} {value:.6g} > {f.name} {limit:g}")
            elif bound == "min" and value < limit:
                out.append(f"{metric} {value:.6g} < {f.name} {limit:g}")
        return out
