"""torchao weight quantization of linear layers through its one verb, ``quantize_(model, config)``.

Schemes, and where torchao 0.18 runs them:

- ``int8-weight-only`` (``Int8WeightOnlyConfig``): int8 weights with one scale per output
  row; activations and compute stay in the model's dtype. CPU and CUDA.
- ``int8-dynamic`` (``Int8DynamicActivationInt8WeightConfig``): int8 weights per row, and
  activations quantized to int8 per token at every call. CPU and CUDA.
- ``int4-weight-only`` (``Int4WeightOnlyConfig``): 4-bit weights with a scale and zero
  point per ``group_size`` inputs, packed for the tinygemm kernel
  (``tile_packed_to_4d``), which computes in bf16 on CUDA GPUs of compute capability
  8.0 or more. torchao 0.18 has no CPU kernel for any of its int4 weight-only layouts:
  the default ``plain`` layout calls mslk's CUDA ops, ``plain_int32`` supports CUDA and
  XPU only, and tinygemm is CUDA-only.

The output projection (``lm_head``) stays in full precision, as transformers' quantizers
leave it. The configs keep torchao's default of setting its recommended inductor flags,
which only matter if a later step compiles the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

SCHEMES = ("int8-weight-only", "int4-weight-only", "int8-dynamic")
# torchao's int8 x int8 product on CUDA is torch._int_mm; where it refuses a product (torch's own check
# wants more than 16 rows, and cuBLAS refuses more shapes on some CUDA versions: 17 rows on CUDA 13),
# torchao's safe_int_mm catches the error and multiplies the int8 values as fp32 (its fallback path).
# Which row counts it refuses is probed on the device the variant is loaded on.
INT_MM_PROBE_ROWS = (1, 2, 4, 8, 16, 17, 24, 32, 64, 128)
CUDA_SMALL_M_FALLBACK = "torchao int8-dynamic on CUDA: torch._int_mm refuses products of"


def int_mm_refused_rows(device: str, rows=INT_MM_PROBE_ROWS) -> list[int]:
    """The row counts among ``rows`` for which ``torch._int_mm`` refuses a (rows x 64) x (64 x 64) int8 product."""
    import torch

    b = torch.ones(64, 64, dtype=torch.int8, device=device)
    refused = []
    for m in rows:
        try:
            torch._int_mm(torch.ones(m, 64, dtype=torch.int8, device=device), b)
        except RuntimeError:
            refused.append(m)
    return refused


def small_product_label(refused: list[int]) -> str:
    """What the int8-dynamic variant says when ``torch._int_mm`` refused some probed row counts here."""
    return (f"{CUDA_SMALL_M_FALLBACK} {', '.join(map(str, refused))} rows here (probed: "
            f"{', '.join(map(str, INT_MM_PROBE_ROWS))}); torchao runs those (a decode step's rows are its batch "
            "size) as fp32 matmuls of the int8 values")


GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm int4 kernel supports
TINYGEMM_IN_MULTIPLE = 1024  # torchao's tile_packed_to_4d layout pads in_features to a multiple of this


@register
@dataclass(frozen=True)
class TorchAO(Step):
    """Quantize every linear layer but ``lm_head`` with one torchao scheme."""

    technique = "torchao"
    stage = "runtime"
    backend = "torch"
    summary = "torchao quantize_: int8 weight-only, int8 dynamic, or int4 weight-only (CUDA) linear layers"
    scheme: str = "int8-weight-only"
    group_size: int = 128  # int4 only: inputs sharing one scale and zero point

    def matmul_dtype(self, before: str, device: str) -> str:
        # int8 dynamic multiplies int8 by int8; int4 weight-only computes in bf16 (its only layout); int8
        # weight-only dequantizes to the activations' dtype.
        return {"int8-dynamic": "int8", "int4-weight-only": "bfloat16"}.get(self.scheme, before)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise RecipeError(f"torchao.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.group_size not in GROUP_SIZES:
            raise RecipeError(f"torchao.group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    def apply(self, state) -> dict:
        if self.scheme == "int4-weight-only":
            _require_int4_device(state.device)
            _load_bf16(state)
        from torchao.quantization import quantize_
        from torchao.utils import TorchAOBaseTensor

        from optimize import introspect

        model = state.model
        before = introspect.weights_bytes(model)
        # quantize_ matches nn.Linear only: GPT-2-style Conv1D layers become equivalent Linears first.
        conv1d = introspect.linearize_conv1d(model)
        targets = {layer.name: layer.module for layer in introspect.linear_layers(model)}  # all but the LM head
        if not targets:
            raise NotApplicable(f"torchao: {type(model).__name__} has no linear layer besides the LM head")
        quantize_(model, self._config(), filter_fn=lambda module, fqn="": fqn in targets and module is targets[fqn])
        # torchao leaves a layer as it was when its shape does not fit the scheme (int4:
        # in_features not a multiple of group_size), so count what really changed.
        left = sorted(name for name, m in targets.items() if not isinstance(m.weight, TorchAOBaseTensor))
        if left:
            note = (f"torchao {self.scheme}: {len(left)} of {len(targets)} linear layers left unquantized, e.g. "
                    f"{left[0]} with (out, in) = {tuple(targets[left[0]].weight.shape)}")
            if self.scheme == "int4-weight-only":
                note += f" (in not a multiple of group_size {self.group_size})"
            if len(left) == len(targets):
                raise NotApplicable(note)
            state.labels.append(note)
        change = introspect.change_report(len(targets) - len(left), len(targets), before,
                                          introspect.weights_bytes(model))
        try:
            introspect.require_effect(f"torchao {self.scheme}", change, shrinks=True)
        except NotApplicable as exc:
            narrow = [name for name, m in targets.items() if m.in_features % TINYGEMM_IN_MULTIPLE]
            if self.scheme != "int4-weight-only" or not narrow:
                raise
            raise NotApplicable(f"{exc}: the tinygemm layout pads each layer's inputs to a multiple of "
                                f"{TINYGEMM_IN_MULTIPLE}; {len(narrow)} of {len(targets)} layers have a count "
                                f"that is not, e.g. {narrow[0]} with {targets[narrow[0]].in_features}") from None
        if conv1d:
            state.labels.append(f"torchao: {conv1d} Conv1D layers converted to equivalent Linear first")
        if self.scheme == "int8-dynamic" and state.device == "cuda" and (refused := int_mm_refused_rows("cuda")):
            state.labels.append(small_product_label(refused))
        report = {"scheme": self.scheme, "quantized_linears": len(targets) - len(left),
                  "unquantized_linears": len(left), "conv1d_converted": conv1d, "lm_head": "not quantized", **change}
        if self.scheme == "int4-weight-only":
            report.update(group_size=self.group_size, layout="tile_packed_to_4d (tinygemm)")
        return report

    def _config(self):
        """The torchao config object for ``scheme``."""
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )

        if self.scheme == "int8-weight-only":
            return Int8WeightOnlyConfig()
        if self.scheme == "int8-dynamic":
            return Int8DynamicActivationInt8WeightConfig()
        return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")


def _require_int4_device(device: str) -> None:
    """Raise ``NotApplicable`` unless ``device`` can run tinygemm's int4 kernel."""
    if device != "cuda":
        raise NotApplicable("torchao int4 weight-only needs CUDA: torchao 0.18 has no CPU kernel for it "
                            "(tile-packed layout: tinygemm, CUDA only; plain: mslk CUDA ops; plain_int32: CUDA/XPU)")
    import torch

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise NotApplicable(f"torchao int4 weight-only needs compute capability >= 8.0 for tinygemm, "
                            f"this GPU has {major}.{minor}")


def _load_bf16(state) -> None:
    """Load the model in bf16, the only dtype the tinygemm layout takes."""
    if not state.loaded:
        state.load(dtype="bfloat16")
    else:
        import torch

        dtype = next(state.model.parameters()).dtype
        if dtype != torch.bfloat16:
            raise RecipeError(f"torchao int4 weight-only needs bf16 weights, an earlier runtime step loaded {dtype}: "
                              "put it first among runtime steps, or after a bf16 cast")
    state.labels.append("torchao int4 weight-only: activations, compute and unquantized layers in bf16")
