"""Dynamic int8 linear layers (weights int8 per tensor, activations quantized at run time).

Uses ``torch.ao.quantization.quantize_dynamic`` by default: deprecated in favour of
torchao, but its fbgemm kernels are the fastest eager int8 path on x86 CPUs (measured on
a 2-core Xeon: ~2x fp32 decode, while torchao's int8 configs ran slower than fp32 in
eager mode). ``api = "torchao"`` selects torchao's Int8DynamicActivationInt8WeightConfig.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

APIS = ("torch.ao", "torchao")


@register
@dataclass(frozen=True)
class TorchInt8Dynamic(Step):
    """int8 weights, activations quantized per call, for every linear-like layer (Linear, Conv1D)."""

    technique = "torch-int8-dynamic"
    stage = "runtime"
    backend = "torch"
    summary = "dynamic int8 linear layers (torch.ao quantize_dynamic or torchao)"
    api: str = "torch.ao"
    include_lm_head: bool = True  # the LM head is the largest matrix of a small model: worth quantizing

    def matmul_dtype(self, before: str, device: str) -> str:
        return "int8"  # activations quantized per call, int8 x int8 products (FBGEMM / torchao)

    def validate(self) -> None:
        if self.api not in APIS:
            raise RecipeError(f"torch-int8-dynamic.api must be one of {APIS}, got {self.api!r}")

    def apply(self, state) -> dict:
        import torch

        from optimize import introspect

        if self.api == "torch.ao" and state.device != "cpu":
            raise NotApplicable("torch.ao dynamic int8 kernels (fbgemm/qnnpack) run on the CPU only; "
                                "use torchao-int8-wo on CUDA")
        model = state.model
        before = introspect.weights_bytes(model)
        head_note, targets = _targets(model, self.include_lm_head)
        # Both quantizers match nn.Linear only: GPT-2-style Conv1D layers become equivalent Linears first.
        conv1d = introspect.linearize_conv1d(model)  # names are kept, so ``targets`` still applies
        if self.api == "torchao":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            from torchao.utils import TorchAOBaseTensor

            quantize_(model, Int8DynamicActivationInt8WeightConfig(),
                      filter_fn=lambda m, fqn: fqn in targets and isinstance(m, torch.nn.Linear))
            touched = sum(1 for name, m in model.named_modules()
                          if name in targets and isinstance(getattr(m, "weight", None), TorchAOBaseTensor))
            api = {"api": "torchao.quantize_(Int8DynamicActivationInt8WeightConfig)"}
        else:
            engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.ao.quantization.quantize_dynamic(model, targets, dtype=torch.qint8)
            state.model = model
            touched = sum(1 for m in model.modules()
                          if type(m).__name__ == "Linear" and "quantized" in type(m).__module__)
            api = {"api": "torch.ao.quantization.quantize_dynamic", "engine": engine}
        report = introspect.change_report(touched, len(targets), before, introspect.weights_bytes(model))
        introspect.require_effect(self.technique, report, shrinks=True)
        if conv1d:
            state.labels.append(f"torch-int8-dynamic: {conv1d} Conv1D layers converted to equivalent Linear first")
        return {**api, "quantized_linears": touched, "conv1d_converted": conv1d, "lm_head": head_note, **report}


def _targets(model, include_lm_head: bool) -> tuple[str, set[str]]:
    """(what happens to the LM head, names of the linear-like layers to quantize).

    A head tied to the input embedding is left out: quantizing it would add an int8 copy
    beside the float table the embedding lookup still reads, so the weights would grow.
    """
    from optimize import introspect

    head = introspect.lm_head(model)
    tied = introspect.tied_embeddings(model)
    quantize_head = include_lm_head and head is not None and not tied
    names = {layer.name for layer in introspect.linear_layers(model, include_lm_head=quantize_head)}
    if quantize_head:
        note = "int8"
    elif include_lm_head and tied:
        note = "not quantized (tied to the input embedding: an int8 copy would add bytes)"
    else:
        note = "not quantized"
    return note, names
