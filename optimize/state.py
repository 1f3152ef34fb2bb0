"""The state a recipe's steps act on, from the reference weights to a runnable variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.models import ModelRef, load_torch_model


@dataclass
class VariantState:
    """What the steps of one recipe read and change.

    ``model`` is loaded lazily from ``source_dir`` on first access, so a runtime step that
    must choose how weights are loaded (bitsandbytes) can call ``load`` itself first.
    """

    ref: ModelRef
    device: str
    source_dir: Path  # HF model directory holding the current weights
    work_dir: Path | None = None  # where saved stages write their artifact
    backend: str = "torch"  # "torch" | "onnxruntime"
    onnx_dir: Path | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # honest notes for reports, e.g. "masked dense"
    reports: list[dict[str, Any]] = field(default_factory=list)  # one per applied step
    trust_remote_code: bool = False
    decoder: Any = None  # a decode loop of the variant's own (optimize.decode); None: the model's generate()
    _model: Any = None

    @property
    def model(self):
        if self._model is None:
            self.load()
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self, dtype: str = "float32", **kwargs) -> Any:
        """Load the torch model from ``source_dir``; refuses to load twice."""
        assert self._model is None, "model already loaded: put loading steps first in the recipe"
        self._model = load_torch_model(str(self.source_dir), self.device, dtype, self.trust_remote_code, **kwargs)
        return self._model
