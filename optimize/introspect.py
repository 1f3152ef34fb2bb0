"""What a causal LM is made of, for any Hugging Face architecture, found from the modules.

Every technique and metric asks here instead of reading Llama's config names
(``intermediate_size``, ``mlp.gate_proj``): linear-like layers (``nn.Linear`` and
transformers' ``Conv1D``, whose weight is stored (in, out)), the LM head and whether it is
tied to the input embedding, the decoder layers with their attention and MLP blocks, the KV
cache per token (read off a real cache), bytes of the weights, and what a technique changed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.errors import NotApplicable


@dataclass(frozen=True)
class LinearLayer:
    """One linear-like layer: ``y = x W^T + b`` whatever the weight's storage order."""

    name: str
    module: Any
    kind: str  # "linear" (weight (out, in)) or "conv1d" (transformers' Conv1D, weight (in, out))
    in_features: int
    out_features: int

    def weight_out_in(self):
        """The weight as an (out, in) tensor; a view of the parameter, so in-place edits stick."""
        weight = self.module.weight
        return weight.T if self.kind == "conv1d" else weight


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def linear_kind(module) -> str | None:
    """``"linear"``, ``"conv1d"`` or None for anything else."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def lm_head(model):
    """The output projection module (None for models without one)."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def tied_embeddings(model) -> bool:
    """True when the LM head and the input embedding share one weight tensor."""
    head = lm_head(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or getattr(head, "weight", None) is None:
        return False
    return head.weight.data_ptr() == embed.weight.data_ptr()


def linear_layers(model, include_lm_head: bool = False) -> list[LinearLayer]:
    """The model's linear-like layers, in module order; the LM head only when asked."""
    head = lm_head(model)
    out = []
    for name, module in model.named_modules():
        kind = linear_kind(module)
        if kind is None or (module is head and not include_lm_head):
            continue
        rows, cols = module.weight.shape
        in_f, out_f = (rows, cols) if kind == "conv1d" else (cols, rows)
        out.append(LinearLayer(name, module, kind, in_f, out_f))
    return out


def decoder_layers(model) -> list:
    """The repeated decoder blocks: the longest ``nn.ModuleList`` of the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise NotApplicable(f"{type(model).__name__}: no list of decoder layers found")
    return list(max(lists, key=len))


def _block(layer, suffixes: tuple[str, ...]):
    """The first child module of ``layer`` whose class name ends with one of ``suffixes``."""
    for name, module in layer.named_children():
        if type(module).__name__.endswith(suffixes):
            return name, module
    return None


def attention_block(layer):
    """``(name, module)`` of a decoder layer's self-attention, or None."""
    return _block(layer, ("Attention", "SdpaAttention", "FlashAttention2"))


def mlp_block(layer):
    """``(name, module)`` of a decoder layer's feed-forward block, or None (OPT keeps fc1/fc2 on the layer)."""
    return _block(layer, ("MLP", "FeedForward"))


@dataclass(frozen=True)
class KVGeometry:
    """Shape of the KV cache: per layer, K and V of (batch, kv_heads, tokens, head_dim)."""

    layers: int
    kv_heads: int
    head_dim: int
    source: str  # "cache" (read from a real forward's cache), "onnx graph" or "config"

    def bytes_per_token(self, element_bytes: float) -> float:
        """2 (K and V) x layers x KV heads x head dim x element bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes


def kv_geometry_from_config(config) -> KVGeometry:
    """The KV-cache shape a config implies (``attribute_map`` covers GPT-2's ``n_head`` etc.)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or (1 if getattr(config, "multi_query", False) else heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim, "config")


def kv_geometry(model) -> KVGeometry:
    """The KV-cache shape read off the cache of a one-token forward pass (torch models).

    Falls back to the config for models whose cache is not a list of (B, H, T, D) tensors.
    """
    import torch

    # A forward compiled by a static-cache step would compile again for this shape: call the original.
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            ids = torch.ones(1, 1, dtype=torch.long, device=device)
            cache = forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
        keys = [layer.keys for layer in cache.layers]
    except Exception:  # a cache class without .layers, or a model that needs more inputs
        return kv_geometry_from_config(model.config)
    _, heads, _, head_dim = keys[0].shape  # (B, kv_heads, T, head_dim)
    return KVGeometry(len(keys), int(heads), int(head_dim), "cache")


def stored_bytes(tensor) -> int:
    """Bytes ``tensor`` holds: a tensor subclass (optimum-quanto's packed values with their scales and zero
    points) counted through the inner tensors it flattens to, as ``torch.compile`` sees it.
    """
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def quantized_kv_bytes_per_token(model, geometry: KVGeometry, cache_config: dict[str, Any], prompt_tokens: int,
                                 new_tokens: int) -> float:
    """Bytes transformers' quantized KV cache holds per token of context, over a decode of ``new_tokens`` after a
    ``prompt_tokens`` prompt: the mean bytes held after each decode step over the mean context.

    What the cache itself stores: packed values with their scales and zero points, and the most
    recent tokens at full precision (up to ``residual_length``, then quantized with the rest). One
    layer of the cache ``generate()`` builds from ``cache_config`` is filled with random keys and
    values of the model's shape and dtype and decoded token by token; every layer holds the same.
    """
    import torch
    from transformers.cache_utils import QuantizedCache

    settings = {k: v for k, v in cache_config.items() if k in ("nbits", "axis_key", "axis_value", "q_group_size",
                                                                "residual_length")}
    cache = QuantizedCache(backend=cache_config.get("backend", "quanto"), config=model.config, **settings)
    layer = cache.layers[0]
    weight = next(p for p in model.parameters() if p.is_floating_point())
    generator = torch.Generator(device="cpu").manual_seed(0)

    def states(tokens: int):
        shape = (1, geometry.kv_heads, tokens, geometry.head_dim)
        return (torch.randn(shape, generator=generator).to(weight.device, weight.dtype) for _ in range(2))

    def held() -> int:
        return sum(stored_bytes(t) for t in (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values))

    with torch.no_grad():
        layer.update(*states(prompt_tokens))
        held_per_step, contexts = [held()], [prompt_tokens]  # a prefill-only scenario: what the prompt left
        for step in range(1, new_tokens):
            layer.update(*states(1))
            held_per_step.append(held())
            contexts.append(prompt_tokens + step)
    if new_tokens > 1:  # the decode steps, not the prompt's
        held_per_step, contexts = held_per_step[1:], contexts[1:]
    return geometry.layers * sum(held_per_step) / sum(contexts)


def state_tensors(model):
    """Every distinct tensor of the state dict once (tied and shared storages counted once)."""
    import torch

    seen: set = set()

    def items(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (tuple, list)):  # torch.ao packed params come as tuples of tensors
            for item in obj:
                yield from items(item)

    for value in model.state_dict().values():
        for t in items(value):
            key = id(t) if t.is_quantized or hasattr(t, "__tensor_flatten__") else t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                yield t


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor, recursing into wrapper subclasses (torchao) that hold inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weights_bytes(model) -> int:
    """Bytes of the model's distinct weight tensors."""
    return sum(tensor_bytes(t) for t in state_tensors(model))


def checkpoint_bytes(model_dir) -> int:
    """Bytes of the weight files of a saved model directory (safetensors or PyTorch)."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin"))


def linearize_conv1d(model) -> int:
    """Replace every ``Conv1D`` by the equivalent ``nn.Linear`` (weight transposed); returns how many.

    Quantizers match ``nn.Linear`` only. ``Conv1D`` computes ``x @ W + b`` with W (in, out),
    so a Linear holding W^T gives the same outputs. Only for models that are not saved
    afterwards: a saved GPT-2 must keep Conv1D's (in, out) weights to load again.
    """
    import torch

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if linear_kind(child) != "conv1d":
                continue
            in_f, out_f = child.weight.shape
            linear = torch.nn.Linear(in_f, out_f, bias=child.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(child.weight.detach().T.contiguous(), requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(parent, name, linear)
            replaced += 1
    return replaced


def change_report(modules_touched: int, modules_eligible: int, bytes_before: int, bytes_after: int,
                  parameters_touched: int | None = None) -> dict[str, int]:
    """The part of a step's report that says what it changed."""
    out = {"modules_touched": modules_touched, "modules_eligible": modules_eligible,
           "bytes_before": bytes_before, "bytes_after": bytes_after}
    if parameters_touched is not None:
        out["parameters_touched"] = parameters_touched
    return out


def require_effect(technique: str, report: dict[str, int], shrinks: bool) -> None:
    """Raise ``NotApplicable`` when a step changed nothing, or grew what it exists to shrink.

    Args:
        technique: the step's name, for the reason.
        report: a ``change_report``.
        shrinks: whether the step's purpose is fewer weight bytes (quantization).

    """
    if report["modules_touched"] == 0:
        raise NotApplicable(f"{technique} changed nothing: none of the model's {report['modules_eligible']} "
                            "eligible modules was touched")
    if shrinks and report["bytes_after"] >= report["bytes_before"]:
        raise NotApplicable(f"{technique} did not shrink the weights ({report['bytes_before']} -> "
                            f"{report['bytes_after']} bytes over {report['modules_touched']} modules)")


def prefill_flops(config, batch: int, prompt: int, cache_dir: Path | None = None, *,
                  last_logits_only: bool) -> int:
    """FLOPs of one prefill of ``batch`` x ``prompt`` tokens, counted by ``torch.utils.flop_counter``.

    ``last_logits_only``: the LM head runs on the last position alone, as ``generate()`` runs a
    transformers model whose forward takes ``logits_to_keep`` (it passes 1); False counts it on
    every position, as an exported ONNX graph computes it. On a small model the head is a large
    share of the prefill (a third of the built-in model's matmul weights), so counting it on every
    position would credit a transformers prefill with FLOPs it never ran.

    The model is rebuilt from ``config`` under a fake-tensor mode (CPU-typed tensors with
    no storage), so nothing is computed or allocated, whatever the model's size; the count
    covers every matmul and attention the architecture really runs
    (sdpa counted as torch's flop formulas do). Cached per config, shape and library versions,
    in this process and on disk under ``cache_dir/flops`` (counting takes ~0.2 s, and every
    cell is a fresh process).
    """
    import hashlib
    import json

    import torch
    import transformers

    from optimize.atomic import write_atomic
    from optimize.models import default_cache_dir

    config_json = config.to_json_string(use_diff=False)
    key = hashlib.sha256(json.dumps([config_json, batch, prompt, last_logits_only, torch.__version__,
                                     transformers.__version__]).encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / "flops" / f"{key}.json"
    try:
        return int(json.loads(path.read_text())["prefill_flops"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not counted yet, or a damaged entry: count again
    flops = _prefill_flops(config_json, batch, prompt, last_logits_only)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # whole or absent: a concurrent cell reads the old state or the new
        write_atomic(path, json.dumps({"prefill_flops": flops, "batch": batch, "prompt": prompt,
                                       "last_logits_only": last_logits_only}))
    except OSError:
        pass  # a read-only cache costs the count again next time, nothing else
    return flops


@functools.lru_cache(maxsize=16)
def _prefill_flops(config_json: str, batch: int, prompt: int, last_logits_only: bool) -> int:
    import inspect
    import json

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    # No pad id and no attention mask: the padding checks read tensor values, which fake tensors have not.
    data["pad_token_id"] = None
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # Eager attention: its masks are built without reading values; its matmuls count the same
        # FLOPs torch's formula gives sdpa (full QK^T and PV, causal or not).
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        ids = torch.zeros(batch, prompt, dtype=torch.long)
        kept = {"logits_to_keep": 1} if last_logits_only and "logits_to_keep" in inspect.signature(
            model.forward).parameters else {}
        with torch.no_grad(), counter:
            model(input_ids=ids, use_cache=False, **kept)
    return int(counter.get_total_flops())
