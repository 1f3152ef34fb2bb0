"""bitsandbytes linear layers, quantized while the weights load: LLM.int8 and 4-bit NF4/FP4.

Both go through transformers' ``BitsAndBytesConfig``, so these steps load the model
themselves and must come first among a recipe's runtime steps. ``lm_head`` stays in full
precision (transformers' default), as do the embeddings and norms: fp32, as in the reference.
bitsandbytes >= 0.43 runs on the CPU as well as on CUDA; transformers needs accelerate to
load with a quantization config.

Two behaviours a reader of the results should know:

- LLM.int8 quantizes activations from fp16: bitsandbytes casts fp32 inputs to fp16 first
  (on CUDA too), and logs that on every call; we note it once in the labels instead.
- On CPUs with AVX512-BF16, each 4-bit layer repacks its weight at its first forward into
  tiles of 32 output rows with bf16 absmax per 64-input block; that needs
  ``out_features % 32 == 0`` and ``in_features % 64 == 0``, which we check up front. Its
  kernel computes in bf16 whatever ``compute_dtype`` says (fp32 inputs are cast to bf16 and
  the outputs back): the labels say so, and the roofline compares it with the bf16 ceiling.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
CPU_TILE_ROWS = 32  # block_n of bitsandbytes.functional._convert_weight_packed_for_cpu
_FP16_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


@register
@dataclass(frozen=True)
class BnbInt8(Step):
    """LLM.int8: int8 weights per row; outlier activation columns are multiplied in fp16."""

    technique = "bnb-int8"
    stage = "runtime"
    backend = "torch"
    summary = "bitsandbytes LLM.int8 linear layers (int8 weights, fp16 outlier decomposition)"
    threshold: float = 6.0  # activation magnitude above which a column stays fp16; 0 disables outliers

    def matmul_dtype(self, before: str, device: str) -> str:
        return "int8"  # int8 x int8 products; only outlier columns go through fp16

    def validate(self) -> None:
        if not self.threshold >= 0:
            raise RecipeError(f"bnb-int8.threshold must be >= 0 (0 turns outliers off), got {self.threshold}")

    def apply(self, state) -> dict:
        _require_libraries(self.technique)
        import bitsandbytes as bnb

        model = _load_quantized(state, self.technique, load_in_8bit=True, llm_int8_threshold=self.threshold)
        change = _change(self.technique, state, model, bnb.nn.Linear8bitLt)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_fp16_cast_notice)
        state.labels.append("LLM.int8: activations cast to fp16 before int8 quantization")
        return {"threshold": self.threshold, "quantized_linears": change["modules_touched"],
                "lm_head": "not quantized", **change}


@register
@dataclass(frozen=True)
class BnbNF4(Step):
    """4-bit weights (NF4 or FP4) in blocks of 64, dequantized to ``compute_dtype`` per matmul."""

    technique = "bnb-nf4"
    stage = "runtime"
    backend = "torch"
    summary = "bitsandbytes 4-bit NF4/FP4 linear layers (QLoRA-style weight-only)"
    compute_dtype: str = "float32"  # dtype of the matmul inputs and outputs
    double_quant: bool = True  # quantize the per-block absmax scales too (saves ~0.37 bit per weight)
    quant_type: str = "nf4"

    def matmul_dtype(self, before: str, device: str) -> str:
        if device == "cpu" and _cpu_repacks_4bit():
            return "bfloat16"  # the AVX512-BF16 kernel casts activations to bf16 whatever compute_dtype says
        return self.compute_dtype  # 4-bit weights dequantized to it for each product

    def validate(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise RecipeError(f"bnb-nf4.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.quant_type not in QUANT_TYPES:
            raise RecipeError(f"bnb-nf4.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")

    def apply(self, state) -> dict:
        if self.compute_dtype == "float16" and state.device == "cpu":
            raise NotApplicable("bnb-nf4 with fp16 compute needs CUDA: CPU matmuls have no fast fp16 kernels here "
                                "(use bfloat16)")
        _require_libraries(self.technique)
        import bitsandbytes as bnb
        import torch

        model = _load_quantized(state, self.technique, load_in_4bit=True,
                                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_quant_type=self.quant_type)
        change = _change(self.technique, state, model, bnb.nn.Linear4bit)
        if state.device == "cpu" and _cpu_repacks_4bit():
            _require_cpu_4bit_shapes(model)
            if self.compute_dtype != "bfloat16":
                state.labels.append(f"bitsandbytes 4-bit CPU kernel (AVX512-BF16): activations and products in bf16, "
                                    f"not compute_dtype {self.compute_dtype}")
        return {"quant_type": self.quant_type, "compute_dtype": self.compute_dtype, "double_quant": self.double_quant,
                "quantized_linears": change["modules_touched"], "lm_head": "not quantized", **change}


def _require_libraries(technique: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise NotApplicable(f"{technique} needs bitsandbytes (pip install 'bitsandbytes>=0.46')") from None
    if importlib.util.find_spec("accelerate") is None:
        raise NotApplicable(f"{technique} needs accelerate to load quantized weights (pip install 'accelerate>=0.26')")


def _load_quantized(state, technique: str, **bnb_config):
    """Load ``state``'s model through ``BitsAndBytesConfig(**bnb_config)``, all of it on ``state.device``."""
    if state.loaded:
        raise RecipeError(f"{technique} quantizes while the weights load: put it first among the runtime steps")
    import torch
    from transformers import BitsAndBytesConfig

    # Without a device_map transformers picks CUDA whenever it exists, even for a CPU run.
    device_map = {"": torch.cuda.current_device()} if state.device == "cuda" else {"": "cpu"}
    return state.load(quantization_config=BitsAndBytesConfig(**bnb_config), device_map=device_map)


def _change(technique: str, state, model, layer_class) -> dict:
    """What loading through bitsandbytes changed: its layers against every linear-like layer, bytes vs the checkpoint.

    Raises ``NotApplicable`` when no layer was replaced or the weights did not shrink.
    """
    from optimize import introspect

    touched = sum(1 for m in model.modules() if isinstance(m, layer_class))
    # bitsandbytes layers subclass nn.Linear: linear_layers counts them as well as the ones left alone.
    eligible = len(introspect.linear_layers(model))
    change = introspect.change_report(touched, eligible, introspect.checkpoint_bytes(state.source_dir),
                                      introspect.weights_bytes(model))
    introspect.require_effect(technique, change, shrinks=True)
    return change


def _cpu_repacks_4bit() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first forward.

    That kernel takes bf16 activations and bf16 block scales whatever ``compute_dtype`` is (its
    ``gemv_4bit`` casts an fp32 input to bf16 and the result back), so on such a CPU the products
    are bf16 ones. False where bitsandbytes is not installed (the step is then skipped anyway).
    """
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _require_cpu_4bit_shapes(model) -> None:
    """Raise ``NotApplicable`` naming the first layer the AVX512-BF16 4-bit kernel cannot take."""
    import bitsandbytes as bnb

    bad = [(name, m.out_features, m.in_features, m.weight.blocksize) for name, m in model.named_modules()
           if isinstance(m, bnb.nn.Linear4bit)
           and (m.out_features % CPU_TILE_ROWS or m.in_features % m.weight.blocksize)]
    if bad:
        name, out_features, in_features, block = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise NotApplicable(f"bitsandbytes 4-bit CPU kernel (AVX512-BF16) needs out_features % {CPU_TILE_ROWS} == 0 "
                            f"and in_features % {block} == 0; {name} is (out, in) = ({out_features}, {in_features})"
                            f"{more}")


def _drop_fp16_cast_notice(record: logging.LogRecord) -> bool:
    """Logging filter: drop bitsandbytes' per-call fp16-cast warning (the labels carry it once)."""
    return not record.getMessage().startswith(_FP16_CAST_NOTICE)
