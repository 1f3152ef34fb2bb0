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

    def matmul_dtype(self, before: str, device: str) -> str:
        """The dtype the variant's matrix products compute in on ``device`` after this step, given the one before it.

        The roofline divides a prefill's achieved rate by the measured matmul rate of this dtype
        ("int8" for integer matmuls). Steps that leave the arithmetic alone keep ``before``; a
        step whose library computes in another dtype than it is configured for on some device
        (bitsandbytes' 4-bit CPU kernel) answers with what the device runs.
        """
        return before

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

    def matmul_dtype(self, device: str) -> str:
        """What the variant's matrix products compute in on ``device``: each step's answer in turn, from fp32."""
        dtype = "float32"
        for step in self.steps:
            dtype = step.matmul_dtype(dtype, device)
        return dtype

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
