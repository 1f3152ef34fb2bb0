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
    """int8 weights, activations quantized per call, for every ``nn.Linear``."""

    technique = "torch-int8-dynamic"
    stage = "runtime"
    backend = "torch"
    summary = "dynamic int8 linear layers (torch.ao quantize_dynamic or torchao)"
    api: str = "torch.ao"
    include_lm_head: bool = True  # the LM head is the largest matrix of a small model: worth quantizing

    def validate(self) -> None:
        if self.api not in APIS:
            raise RecipeError(f"torch-int8-dynamic.api must be one of {APIS}, got {self.api!r}")

    def apply(self, state) -> dict:
        import torch

        if self.api == "torchao":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            keep_head = None if self.include_lm_head else (lambda m, fqn: "lm_head" not in fqn and _is_linear(m))
            quantize_(state.model, Int8DynamicActivationInt8WeightConfig(), filter_fn=keep_head)
            return {"api": "torchao.quantize_(Int8DynamicActivationInt8WeightConfig)",
                    "lm_head": "int8" if self.include_lm_head else "not quantized"}
        if state.device != "cpu":
            raise NotApplicable("torch.ao dynamic int8 kernels (fbgemm/qnnpack) run on the CPU only; "
                                "use torchao-int8-wo on CUDA")
        engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            spec = {torch.nn.Linear} if self.include_lm_head else {
                name for name, m in state.model.named_modules() if _is_linear(m) and not name.endswith("lm_head")}
            state.model = torch.ao.quantization.quantize_dynamic(state.model, spec, dtype=torch.qint8)
        n = sum(1 for m in state.model.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__)
        return {"api": "torch.ao.quantization.quantize_dynamic", "engine": engine, "quantized_linears": n,
                "lm_head": "int8" if self.include_lm_head else "not quantized"}


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)
