"""Recipes: a reference model plus an ordered list of typed, frozen technique steps.

A step is a frozen dataclass registered under a technique name (see ``registry``). Its
``stage`` says where it sits in the build:

- ``weights``: changes the PyTorch weights (pruning); the result is saved as a Hugging
  Face model directory in the variant store;
- ``export``: turns the model into another format (ONNX); saved;
- ``graph``: transforms the exported graph (ONNX Runtime quantization); saved;
- ``runtime``: applied each time the variant is loaded (dtype casts, dynamic int8,
  bitsandbytes, KV-cache settings, compilation), because their results are either
  cheap to recreate or cannot be stored in a safe format.

Stages must appear in that order; the store keys an artifact by the steps up to the
last saved one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optimize.errors import RecipeError

STAGES = ("weights", "export", "graph", "runtime")
RECIPE_KEYS = ("name", "steps", "description")
SAVED_STAGES = ("weights", "export", "graph")


@dataclass(frozen=True)
class Step:
    """Base of every technique config. Subclasses set ``technique`` and ``stage``."""

    technique: ClassVar[str] = ""
    stage: ClassVar[str] = "runtime"
    backend: ClassVar[str] = "any"  # "torch", "onnxruntime" or "any": what the step needs to run on
    summary: ClassVar[str] = ""
    changes_kv_cache: ClassVar[bool] = False  # True: drift is scored through the variant's cache
    version: int = 1

    def validate(self) -> None:
        """Raise ``RecipeError`` for out-of-range fields. Subclasses extend."""

    def is_lossless(self) -> bool:
        """True when the step must not change greedy outputs (checked when a variant is built)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        data = {"technique": self.technique}
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return data


@dataclass(frozen=True)
class Recipe:
    """A named variant: the ordered steps applied to the reference model."""

    name: str
    steps: tuple[Step, ...] = ()
    description: str = ""
    tags: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        order = [STAGES.index(s.stage) for s in self.steps]
        if order != sorted(order):
            got = " -> ".join(f"{s.technique} ({s.stage})" for s in self.steps)
            raise RecipeError(f"variant {self.name!r}: steps must go weights -> export -> graph -> runtime, got {got}")
        exports = [s for s in self.steps if s.stage == "export"]
        if len(exports) > 1:
            raise RecipeError(f"variant {self.name!r}: at most one export step, got {len(exports)}")
        if any(s.stage == "graph" for s in self.steps) and not exports:
            raise RecipeError(f"variant {self.name!r}: graph steps need an export step before them")
        for s in self.steps:
            s.validate()

    @property
    def backend(self) -> str:
        """``onnxruntime`` once an export step is present, else ``torch``."""
        return "onnxruntime" if any(s.stage == "export" for s in self.steps) else "torch"

    @property
    def lossless(self) -> bool:
        return all(s.is_lossless() for s in self.steps)

    @property
    def saved_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.stage in SAVED_STAGES)

    @property
    def runtime_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.stage == "runtime")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    def content_hash(self, steps: tuple[Step, ...] | None = None) -> str:
        """sha256 of the canonical JSON of ``steps`` (all steps by default); the name is not hashed."""
        payload = [s.to_dict() for s in (self.steps if steps is None else steps)]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def step_from_dict(data: dict[str, Any], where: str = "step") -> Step:
    """Build a step from its dict form (as written in a matrix file)."""
    from optimize.registry import technique_class

    if not isinstance(data, dict) or not isinstance(data.get("technique"), str):
        raise RecipeError(f"{where}: each step needs a 'technique' key naming a technique, got {data!r}")
    params = dict(data)
    try:
        cls = technique_class(params.pop("technique"))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise RecipeError(f"{where}: technique {cls.technique!r} has no parameter {unknown[0]!r}; "
                          f"allowed: {', '.join(sorted(known))}")
    for key, value in params.items():
        params[key] = _typed_param(cls, known[key], value, where)
    return cls(**params)


def _typed_param(cls, spec: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` checked against the field's default type.

    A string is never a boolean, a boolean never a number, NaN or an infinity never a setting.
    """
    default = spec.default
    name = f"{cls.technique}.{spec.name}"
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: {name} must be a finite number, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {name} must be a list, got {value!r}")
        return tuple(value)
    if default is dataclasses.MISSING or default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise RecipeError(f"{where}: {name} must be {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise RecipeError(f"{where}: {name} must be {type(default).__name__}, got {value!r}")
    return value


def recipe_from_dict(data: dict[str, Any], where: str = "variant") -> Recipe:
    """A recipe from its dict form (a ``[[recipe]]`` table); unknown keys are errors, with did-you-mean."""
    from optimize.registry import did_you_mean

    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a table with {', '.join(RECIPE_KEYS)}, got {data!r}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"{where}: {unknown[0]!r} is not a recipe key{did_you_mean(unknown[0], RECIPE_KEYS)}; "
                          f"allowed: {', '.join(RECIPE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: an inline variant needs a non-empty 'name'")
    if not isinstance(data.get("description", ""), str):
        raise RecipeError(f"{where}: 'description' must be a string, got {data['description']!r}")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise RecipeError(f"{where}: 'steps' must be a list of tables, got {steps!r}")
    built = tuple(step_from_dict(s, f"{where} {name!r} step {i}") for i, s in enumerate(steps))
    try:
        return Recipe(name=name, steps=built, description=data.get("description", ""))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
