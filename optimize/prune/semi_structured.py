"""2:4 semi-structured sparsity: the pruning (saved) and the sparse kernels (at load).

``prune-2of4`` keeps the two largest-magnitude weights of every four consecutive weights
along the input dimension of each decoder linear layer, the pattern NVIDIA's sparse
tensor cores (compute capability >= 8.0) multiply at up to twice the dense rate.
``sparse-2of4-kernels`` then compresses those weights with
``torch.sparse.to_sparse_semi_structured`` so the matmuls really run sparse. The kernels
take fp16 or bf16 only, so on CUDA a recipe needs, in order: ``prune-2of4`` (weights),
``cast`` (runtime), ``sparse-2of4-kernels`` (runtime). Where no such kernels exist (CPU,
older GPUs) the kernel step keeps the masked dense weights and labels the variant so.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import NotApplicable, RecipeError
from optimize.prune.magnitude import sparsity_report
from optimize.recipe import Step
from optimize.registry import register

GROUP = 4  # weights per group along the input dimension
KEEP = 2  # non-zeros kept per group
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and later
CUTLASS_MAJOR = 8  # torch's CUTLASS semi-structured kernels: compute capability 8.x alone; later GPUs need cuSPARSELt
KERNEL_DTYPES = ("float16", "bfloat16")


def mask_2of4(weight):
    """Mask (same shape as ``weight`` (out, in)) keeping the 2 largest |w| of each 4 along ``in``."""
    import torch

    out_features, in_features = weight.shape
    groups = weight.detach().abs().reshape(out_features, in_features // GROUP, GROUP)  # (out, in/4, 4)
    keep = groups.topk(KEEP, dim=-1).indices  # (out, in/4, 2)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


def holds_2of4(weight) -> bool:
    """True when every group of 4 consecutive weights along the input dimension has <= 2 non-zeros."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        return False
    nonzeros = (weight.detach() != 0).reshape(out_features, in_features // GROUP, GROUP).sum(-1)  # (out, in/4)
    return bool((nonzeros <= KEEP).all())


@register
@dataclass(frozen=True)
class SemiStructured24(Step):
    """Zero 2 of every 4 consecutive weights (the smallest in magnitude) in each decoder linear."""

    technique = "prune-2of4"
    stage = "weights"
    backend = "torch"
    summary = "2:4 semi-structured magnitude pruning of decoder linear weights"

    def apply(self, state) -> dict:
        import torch

        from optimize.introspect import linear_layers

        layers = linear_layers(state.model)  # Conv1D weights are (in, out): work on their (out, in) view
        if not layers:
            raise NotApplicable(f"prune-2of4 found no linear-like layer in {type(state.model).__name__}")
        odd = next(((layer.name, layer.in_features) for layer in layers if layer.in_features % GROUP), None)
        if odd:
            raise NotApplicable(f"prune-2of4 needs input widths divisible by {GROUP}; {odd[0]} has {odd[1]}")
        with torch.no_grad():
            for layer in layers:
                weight = layer.weight_out_in()
                weight.mul_(mask_2of4(weight))
        return {"pattern": f"{KEEP}:{GROUP}", "layers": len(layers), "modules_touched": len(layers),
                "pattern_holds": all(holds_2of4(layer.weight_out_in()) for layer in layers),
                **sparsity_report(state.model)}


def _sparse_class():
    """The semi-structured tensor class ``to_sparse_semi_structured`` would use here, and its name."""
    import torch
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS, "cutlass"
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT, "cusparselt"


def _no_kernels_reason(state) -> str | None:
    """Why this device has no semi-structured sparse kernels, or None when it has them."""
    import torch

    if state.device != "cuda" or not torch.cuda.is_available():
        return state.device
    capability = torch.cuda.get_device_capability()
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} ({cc} < 8.0)"
    if _sparse_class()[1] == "cutlass" and capability[0] != CUTLASS_MAJOR:
        # torch's CUTLASS kernels refuse any other at the first product (an H200 without cuSPARSELt)
        return f"{torch.cuda.get_device_name()} ({cc}) without cuSPARSELt: torch's CUTLASS 2:4 kernels run on 8.x only"
    return None


@register
@dataclass(frozen=True)
class SparseKernels24(Step):
    """Run 2:4-sparse linear weights through semi-structured sparse kernels where they exist."""

    technique = "sparse-2of4-kernels"
    stage = "runtime"
    backend = "torch"
    summary = "semi-structured (2:4) sparse matmul kernels; masked dense where there are none"

    def apply(self, state) -> dict:
        from optimize.introspect import linear_layers

        linears = linear_layers(state.model)
        layers = [(layer.name, layer.module) for layer in linears if holds_2of4(layer.weight_out_in())]
        if not layers:
            raise RecipeError("sparse-2of4-kernels: no decoder linear holds the 2:4 pattern; "
                              "put prune-2of4 before it in the recipe")
        device = _no_kernels_reason(state)
        if device is not None:
            reason = f"no semi-structured sparse kernels on {device}"
            state.labels.append(f"2:4 sparsity as masked dense weights: {reason}")
            return {"sparse_kernels": False, "reason": reason, "layers_2of4": len(layers), "layers": len(linears)}
        dtypes = sorted({str(module.weight.dtype).removeprefix("torch.") for _, module in layers})
        unsupported = [d for d in dtypes if d not in KERNEL_DTYPES]
        if unsupported:
            raise NotApplicable(f"sparse-2of4-kernels needs fp16/bf16 weights, got {', '.join(unsupported)}: "
                                "put a cast step before it in the recipe")
        return _convert(state, layers)


def _convert(state, layers) -> dict:
    """Replace each eligible weight by its compressed semi-structured form; report what was left."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    cls, kernel = _sparse_class()
    converted, skipped = 0, {}
    for name, module in layers:
        weight = module.weight
        limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
        rows, cols = weight.shape
        if type(module).__name__ == "Conv1D":  # x @ W with W (in, out): the sparse kernels take F.linear weights
            skipped[name] = "Conv1D layer: the sparse kernels need an nn.Linear (out, in) weight"
        elif limits is None:
            skipped[name] = f"dtype {weight.dtype} unsupported by {kernel}"
        elif rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            skipped[name] = (f"shape {rows}x{cols} not a multiple of "
                             f"{limits.sparse_min_rows}x{limits.sparse_min_cols}")
        else:
            sparse = (to_sparse_semi_structured(weight.detach().contiguous()) if kernel == "cusparselt"
                      else cls.from_dense(weight.detach().contiguous()))
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
            converted += 1
    if not converted:
        raise NotApplicable(f"sparse-2of4-kernels: no layer fits the {kernel} kernels "
                            f"(e.g. {next(iter(skipped.items()))})")
    if skipped:
        state.labels.append(f"2:4 sparse kernels on {converted} of {len(layers)} layers; the rest masked dense")
    else:
        state.labels.append(f"2:4 semi-structured sparse kernels ({kernel})")
    return {"sparse_kernels": True, "kernel": kernel, "layers_converted": converted,
            "layers_skipped": len(skipped), "skipped": skipped}
