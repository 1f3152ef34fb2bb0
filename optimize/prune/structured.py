"""Structured pruning: remove whole FFN neurons (and optionally KV-head groups) for real.

Unlike masking, the matrices shrink: ``gate_proj``/``up_proj`` lose rows, ``down_proj``
loses columns, and with head pruning ``q/k/v_proj`` lose rows and ``o_proj`` columns. The
model config is updated to match, so the saved directory loads with plain
``AutoModelForCausalLM.from_pretrained``. A config has one width for all layers, so every
layer loses the same number of neurons (heads): its own least important ones.

Supports Llama-style decoders (``model.layers[i].mlp.{gate,up,down}_proj`` with a gated
FFN, ``self_attn.{q,k,v,o}_proj``): Llama, Mistral, Qwen2 and the like.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimize.errors import InputError, NotApplicable, RecipeError
from optimize.recipe import Step
from optimize.registry import register

IMPORTANCES = ("weight", "activation")
CALIBRATION_WINDOWS = 8  # windows of the evaluation text for activation importance
CALIBRATION_TOKENS = 128  # tokens per window


def kept_width(width: int, ratio: float, multiple_of: int) -> int:
    """How many of ``width`` units to keep after removing ``ratio``, rounded to a multiple of ``multiple_of``."""
    keep = max(multiple_of, int(width * (1 - ratio) / multiple_of + 0.5) * multiple_of)  # nearest, half up
    if keep >= width:
        raise NotApplicable(f"prune-ffn: removing {ratio:.0%} of {width} neurons and rounding to a multiple of "
                            f"{multiple_of} keeps all of them; raise ratio or lower multiple_of")
    return keep


def kept_groups(groups: int, heads_ratio: float) -> int:
    """KV-head groups kept when removing ``heads_ratio`` of ``groups`` (rounded half up)."""
    drop = int(groups * heads_ratio + 0.5)
    if drop < 1 or drop >= groups:
        raise NotApplicable(f"prune-ffn: heads_ratio {heads_ratio} of {groups} KV-head groups removes {drop}; "
                            f"need between 1 and {groups - 1}")
    return groups - drop


@register
@dataclass(frozen=True)
class StructuredPrune(Step):
    """Remove the least important FFN neurons (and KV-head groups) of every decoder layer."""

    technique = "prune-ffn"
    stage = "weights"
    backend = "torch"
    summary = "structured pruning: remove FFN neurons (and KV-head groups), shrinking the matrices"
    ratio: float = 0.25  # fraction of FFN intermediate neurons removed per layer, 0 < ratio < 1
    heads_ratio: float = 0.0  # fraction of KV-head groups removed per layer (with their query heads); 0 keeps all
    importance: str = "weight"  # "weight" (magnitudes) or "activation" (on calibration text)
    multiple_of: int = 64  # the kept FFN width is a multiple of this, so tiled kernels still fit

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise RecipeError(f"prune-ffn.ratio must be in (0, 1), got {self.ratio}")
        if not 0 <= self.heads_ratio < 1:
            raise RecipeError(f"prune-ffn.heads_ratio must be in [0, 1), got {self.heads_ratio}")
        if self.importance not in IMPORTANCES:
            raise RecipeError(f"prune-ffn.importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise RecipeError(f"prune-ffn.multiple_of must be an integer >= 1, got {self.multiple_of!r}")

    def apply(self, state) -> dict:
        import torch

        model = state.model
        config = model.config
        layers = _decoder_layers(model)
        widths = {layer.mlp.gate_proj.out_features for layer in layers}
        if len(widths) > 1:
            raise NotApplicable(f"prune-ffn: the decoder layers differ in FFN width ({sorted(widths)}); one config "
                                "width cannot describe them")
        width = widths.pop()
        keep_width = kept_width(width, self.ratio, self.multiple_of)
        heads = config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        keep_groups = kept_groups(groups, self.heads_ratio) if self.heads_ratio else groups
        params_before = sum(p.numel() for p in model.parameters())

        if self.importance == "activation":
            ffn_scores, head_scores = _activation_scores(state, layers, head_dim, heads // groups,
                                                         with_heads=keep_groups < groups)
            state.labels.append("prune-ffn importance calibrated on the evaluation text: "
                                "drift measured on that text is optimistic")
        else:
            ffn_scores = [_ffn_weight_scores(layer.mlp) for layer in layers]
            head_scores = [_head_weight_scores(layer.self_attn, head_dim, heads // groups)
                           if keep_groups < groups else None for layer in layers]

        with torch.no_grad():
            for layer, ffn, group in zip(layers, ffn_scores, head_scores, strict=True):
                _shrink_mlp(layer.mlp, _top(ffn, keep_width))
                if keep_groups < groups:
                    _shrink_attention(layer.self_attn, _top(group, keep_groups), head_dim, heads // groups)

        before = {"intermediate_size": width, "num_attention_heads": heads, "num_key_value_heads": groups}
        config.intermediate_size = keep_width
        if keep_groups < groups:
            config.num_attention_heads = keep_groups * (heads // groups)
            config.num_key_value_heads = keep_groups
            config.head_dim = head_dim  # heads * head_dim no longer equals hidden_size: say it explicitly
        params_after = sum(p.numel() for p in model.parameters())
        return {
            "importance": self.importance,
            "ratio_target": self.ratio,
            "ratio_achieved": 1 - keep_width / width,
            "heads_ratio_target": self.heads_ratio,
            "heads_ratio_achieved": 1 - keep_groups / groups,
            **{f"{k}_before": v for k, v in before.items()},
            "intermediate_size_after": keep_width,
            "num_attention_heads_after": config.num_attention_heads,
            "num_key_value_heads_after": config.num_key_value_heads,
            "head_dim": head_dim,
            "parameters_before": params_before,
            "parameters_after": params_after,
            "parameters_removed_fraction": 1 - params_after / params_before,
        }


def _decoder_layers(model) -> list:
    """The decoder layers, checked to have the projections this pruner rewrites."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "self_attn.o_proj")
    arch = type(model).__name__
    if not layers:
        raise NotApplicable(f"prune-ffn supports Llama-style decoders (model.layers); {arch} has none")
    for path in needed:
        owner, name = path.split(".")
        if not hasattr(getattr(layers[0], owner, None), name):
            raise NotApplicable(f"prune-ffn supports Llama-style decoders; {arch} layers have no {path}")
    if not hasattr(model.config, "intermediate_size"):
        raise NotApplicable(f"prune-ffn: {arch} config has no intermediate_size to update")
    return list(layers)


def _top(scores, k: int):
    """Indices of the ``k`` highest scores, in their original order (so kept units keep their layout)."""
    return scores.topk(k).indices.sort().values


def _column_norms(weight):
    return weight.float().norm(dim=0)  # (in,)


def _row_norms(weight):
    return weight.float().norm(dim=1)  # (out,)


def _ffn_weight_scores(mlp):
    """(intermediate,) scores: |gate row| * |up row| * |down column|.

    For an input of a given size, neuron j's hidden value scales with both its gate and up
    rows, and what it adds to the output with its down column.
    """
    return _row_norms(mlp.gate_proj.weight) * _row_norms(mlp.up_proj.weight) * _column_norms(mlp.down_proj.weight)


def _head_weight_scores(attn, head_dim: int, rep: int):
    """(kv_groups,) scores: |value rows| * |output columns| of each KV group and its query heads.

    Queries and keys only shape the attention pattern; the size of a head's contribution
    goes through its values and its slice of the output projection.
    """
    v = attn.v_proj.weight.float()  # (groups * head_dim, hidden)
    o = attn.o_proj.weight.float()  # (hidden, heads * head_dim), heads = groups * rep
    groups = v.shape[0] // head_dim
    v_norm = v.reshape(groups, head_dim * v.shape[1]).norm(dim=1)
    o_norm = o.T.reshape(groups, rep * head_dim * o.shape[0]).norm(dim=1)
    return v_norm * o_norm


def _activation_scores(state, layers, head_dim: int, rep: int, with_heads: bool):
    """Per-layer FFN and KV-group scores from activations on windows of the evaluation text.

    A unit scores its mean |input to the next projection| (SwiGLU hidden for down_proj,
    attention output for o_proj) times the norm of the weights that carry it out, as Wanda
    weighs activations by weights: a large activation into tiny weights changes nothing.
    """
    import torch

    model = state.model
    windows = _calibration_windows(state)  # (W, T)
    # Sum of |input| per input feature of each layer's down_proj and o_proj.
    sums = {}
    handles = []
    for i, layer in enumerate(layers):
        for part, proj in (("ffn", layer.mlp.down_proj), ("attn", layer.self_attn.o_proj)):
            sums[part, i] = torch.zeros(proj.in_features, device=windows.device)
            handles.append(proj.register_forward_pre_hook(_accumulator(sums[part, i])))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = windows.numel()
    ffn, heads = [], []
    for i, layer in enumerate(layers):
        ffn.append(sums["ffn", i].cpu() / tokens * _column_norms(layer.mlp.down_proj.weight).cpu())
        if with_heads:
            o_proj = layer.self_attn.o_proj
            per_column = sums["attn", i].cpu() / tokens * _column_norms(o_proj.weight).cpu()  # (heads * head_dim,)
            heads.append(per_column.reshape(-1, rep * head_dim).sum(dim=1))  # (groups,)
        else:
            heads.append(None)
    return ffn, heads


def _accumulator(total):
    def hook(module, args) -> None:
        total.add_(args[0].detach().abs().float().sum(dim=(0, 1)))  # (B, T, features) -> (features,)
    return hook


def _calibration_windows(state):
    """(W, T) token windows spread evenly over the evaluation text, on the model's device."""
    import torch

    from optimize.models import eval_token_ids

    config = state.model.config
    stream = eval_token_ids(state.ref, config.vocab_size, trust_remote_code=state.trust_remote_code)
    length = min(CALIBRATION_TOKENS, getattr(config, "max_position_embeddings", CALIBRATION_TOKENS))
    count = min(CALIBRATION_WINDOWS, len(stream) // length)
    if count < 1:
        raise InputError(f"prune-ffn: the evaluation text has {len(stream)} tokens, fewer than one "
                         f"calibration window of {length}")
    starts = torch.linspace(0, len(stream) - length, count).long().tolist()
    device = next(state.model.parameters()).device
    return torch.stack([stream[s : s + length] for s in starts]).to(device)


def _sliced_linear(linear, rows=None, cols=None):
    """A new ``nn.Linear`` holding ``linear``'s ``rows`` (output units) and ``cols`` (input units)."""
    import torch

    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    # Built on the meta device: no time spent initialising weights that are replaced at once.
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    return new


def _shrink_mlp(mlp, keep) -> None:
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def _shrink_attention(attn, keep_groups, head_dim: int, rep: int) -> None:
    """Keep the KV groups ``keep_groups`` and their ``rep`` query heads each, so GQA stays consistent."""
    import torch

    def units(groups, size: int):
        return torch.cat([torch.arange(g * size, (g + 1) * size) for g in groups.tolist()])

    q_units = units(keep_groups, rep * head_dim)  # query heads of group g: g*rep .. (g+1)*rep - 1
    kv_units = units(keep_groups, head_dim)
    attn.q_proj = _sliced_linear(attn.q_proj, rows=q_units)
    attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_units)
    attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_units)
    attn.o_proj = _sliced_linear(attn.o_proj, cols=q_units)
    for name, value in (("num_heads", len(keep_groups) * rep), ("num_key_value_heads", len(keep_groups))):
        if hasattr(attn, name):
            setattr(attn, name, value)
