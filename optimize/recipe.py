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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optimize.errors import RecipeError

STAGES = ("weights", "export", "graph", "runtime")
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

    if not isinstance(data, dict) or "technique" not in data:
        raise RecipeError(f"{where}: each step needs a 'technique' key, got {data!r}")
    params = dict(data)
    try:
        cls = technique_class(str(params.pop("technique")))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise RecipeError(f"{where}: technique {cls.technique!r} has no parameter {unknown[0]!r}; "
                          f"allowed: {', '.join(sorted(known))}")
    for key, value in params.items():
        default = known[key].default
        if isinstance(default, tuple) and isinstance(value, list):
            params[key] = tuple(value)
        elif default is not dataclasses.MISSING and default is not None and not isinstance(value, type(default)):
            if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise RecipeError(f"{where}: {cls.technique}.{key} must be {type(default).__name__}, got {value!r}")
            params[key] = float(value)
    return cls(**params)


def recipe_from_dict(data: dict[str, Any], where: str = "variant") -> Recipe:
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: an inline variant needs a non-empty 'name'")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise RecipeError(f"{where}: 'steps' must be a list of tables, got {steps!r}")
    built = tuple(step_from_dict(s, f"{where} {name!r} step {i}") for i, s in enumerate(steps))
    try:
        return Recipe(name=name, steps=built, description=str(data.get("description", "")))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
