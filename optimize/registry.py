"""The one registry of techniques and named variants.

Technique modules register their step class with ``@register``; they are imported on the
first lookup, and none of them imports a heavy library at module level. Named variants
are recipes built from those steps, declared once in ``_VARIANTS`` below. A step or recipe
given as a dict (a matrix file's table) is parsed here, against the registered techniques.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from dataclasses import dataclass
from typing import Any

from optimize.errors import InputError, RecipeError
from optimize.recipe import RECIPE_KEYS, Recipe, Step

# Modules whose import registers techniques. Order is irrelevant.
TECHNIQUE_MODULES = (
    "optimize.quantize.cast",
    "optimize.quantize.torch_int8",
    "optimize.quantize.torchao",
    "optimize.quantize.bnb",
    "optimize.export.onnx",
    "optimize.quantize.ort",
    "optimize.prune.magnitude",
    "optimize.prune.semi_structured",
    "optimize.prune.structured",
    "optimize.kvcache",
)

_TECHNIQUES: dict[str, type[Step]] = {}
_loaded = False


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available under ``cls.technique``."""
    if not cls.technique or cls.technique in _TECHNIQUES:
        raise AssertionError(f"technique name missing or registered twice: {cls.technique!r}")
    _TECHNIQUES[cls.technique] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in TECHNIQUE_MODULES:
            importlib.import_module(module)


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def first_repeat(values):
    """The first value a list names a second time, or None (a list of names or sizes given twice is a typo)."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def techniques() -> dict[str, type[Step]]:
    _load()
    return dict(_TECHNIQUES)


def technique_class(name: str) -> type[Step]:
    _load()
    try:
        return _TECHNIQUES[name]
    except KeyError:
        raise RecipeError(
            f"unknown technique {name!r}{did_you_mean(name, _TECHNIQUES)}; known: {', '.join(sorted(_TECHNIQUES))}"
        ) from None


@dataclass(frozen=True)
class VariantInfo:
    """A built-in variant: its recipe, what it does and where it applies."""

    recipe: Recipe
    applies: str


# name: (steps as dicts, description, where it applies)
_VARIANTS: dict[str, tuple[list[dict], str, str]] = {
    "fp32": ([], "reference weights in fp32, eager PyTorch, default dynamic KV cache", "everywhere"),
    "fp16": ([{"technique": "cast", "dtype": "float16"}], "weights and compute cast to fp16", "CUDA"),
    "bf16": ([{"technique": "cast", "dtype": "bfloat16"}], "weights and compute cast to bf16", "CPU, CUDA"),
    "torch-int8-dynamic": ([{"technique": "torch-int8-dynamic"}],
                           "dynamic int8 linear layers (per-tensor int8 weights, activations quantized per call)",
                           "CPU"),
    "torchao-int8-wo": ([{"technique": "torchao", "scheme": "int8-weight-only"}],
                        "torchao int8 weight-only quantization of linear layers", "CPU, CUDA"),
    "torchao-int4-wo": ([{"technique": "torchao", "scheme": "int4-weight-only"}],
                        "torchao int4 weight-only quantization (group size 128, bf16 compute)", "CUDA sm80+"),
    "bnb-int8": ([{"technique": "bnb-int8"}], "bitsandbytes LLM.int8 (outlier threshold 6.0)", "CPU, CUDA"),
    "bnb-nf4": ([{"technique": "bnb-nf4"}], "bitsandbytes 4-bit NF4 weights, compute in the configured dtype",
                "CPU, CUDA (layer widths must suit the 4-bit kernels)"),
    "onnx-fp32": ([{"technique": "onnx-export"}], "ONNX export with past key/values, ONNX Runtime", "CPU, CUDA"),
    "onnx-fp16": ([{"technique": "onnx-export", "dtype": "float16"}], "ONNX export in fp16, ONNX Runtime", "CUDA"),
    "onnx-int8-dynamic": ([{"technique": "onnx-export"}, {"technique": "ort-int8-dynamic"}],
                          "ONNX Runtime dynamic int8 quantization of MatMul weights", "CPU, CUDA"),
    "onnx-int8-static": ([{"technique": "onnx-export"}, {"technique": "ort-int8-static"}],
                         "ONNX Runtime static QDQ int8, calibrated on evaluation text", "CPU, CUDA"),
    "prune-50": ([{"technique": "prune-magnitude", "sparsity": 0.5}],
                 "50% unstructured magnitude pruning of linear weights (per layer)", "everywhere (dense kernels)"),
    "prune-2of4": ([{"technique": "prune-2of4"}, {"technique": "sparse-2of4-kernels"}],
                   "2:4 semi-structured pruning; masked dense weights where there are no sparse kernels",
                   "CPU, CUDA below sm80 (masked dense); skipped on sm80+ (fp32): use prune-2of4-fp16"),
    "prune-2of4-fp16": ([{"technique": "prune-2of4"}, {"technique": "cast", "dtype": "float16"},
                         {"technique": "sparse-2of4-kernels"}],
                        "2:4 pruning in fp16 with semi-structured sparse kernels",
                        "CUDA (sparse kernels on sm80+, masked dense below); skipped on the CPU (fp16)"),
    "prune-ffn-25": ([{"technique": "prune-ffn", "ratio": 0.25}],
                     "structured: removes the 25% least important FFN neurons per layer (matrices shrink)",
                     "CPU, CUDA (dense kernels); Llama-style gated FFNs only: skipped on GPT-2, OPT, GPT-NeoX, Phi"),
    "no-kv-cache": ([{"technique": "kv-cache", "mode": "none"}], "no KV cache: every step recomputes the prefix",
                    "everywhere"),
    "static-kv": ([{"technique": "kv-cache", "mode": "static", "compile": True}],
                  "static KV cache with torch.compile", "CPU, CUDA"),
    "kv-int4": ([{"technique": "kv-cache", "mode": "quantized", "nbits": 4}],
                "KV cache quantized to 4 bits (optimum-quanto backend)", "CPU, CUDA"),
}


def variants() -> dict[str, VariantInfo]:
    """All built-in variants, in declaration order."""
    out = {}
    for name, (steps, description, applies) in _VARIANTS.items():
        recipe = Recipe(name=name, steps=tuple(step_from_dict(s, f"variant {name!r}") for s in steps),
                        description=description)
        out[name] = VariantInfo(recipe=recipe, applies=applies)
    return out


def builtin_variant(name: str) -> Recipe:
    if name not in _VARIANTS:
        raise InputError(f"unknown variant {name!r}{did_you_mean(name, _VARIANTS)}; see 'infermatrix variants'")
    return variants()[name].recipe


def variant_names() -> list[str]:
    return list(_VARIANTS)


# --- steps and recipes from their dict form ---------------------------------------------


def step_from_dict(data: dict[str, Any], where: str = "step") -> Step:
    """Build a step from its dict form (as written in a matrix file)."""
    if not isinstance(data, dict) or not isinstance(data.get("technique"), str):
        raise RecipeError(f"{where}: each step needs a 'technique' key naming a technique, got {data!r}")
    params = dict(data)
    try:
        cls = technique_class(params.pop("technique"))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise RecipeError(f"{where}: technique {cls.technique!r} has no parameter {unknown[0]!r}; "
                          f"allowed: {', '.join(sorted(known))}")
    for key, value in params.items():
        params[key] = _typed_param(cls, known[key], value, where)
    return cls(**params)


def _typed_param(cls, spec: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` checked against the field's default type.

    A string is never a boolean, a boolean never a number, NaN or an infinity never a setting.
    """
    default = spec.default
    name = f"{cls.technique}.{spec.name}"
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: {name} must be a finite number, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {name} must be a list, got {value!r}")
        return tuple(value)
    if default is dataclasses.MISSING or default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise _wrong_type(where, name, default, value)
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise _wrong_type(where, name, default, value)
    return value


# a recipe's settings are written in TOML: its words, not Python's, say what a setting takes
_TOML_KINDS = {bool: "true or false (a TOML boolean, unquoted)", int: "a whole number", float: "a number",
               str: "a string (quoted)"}


def _wrong_type(where: str, name: str, default: Any, value: Any) -> RecipeError:
    """A setting of another type than its default's, in TOML's words (``true``, not Python's ``True``)."""
    given = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return RecipeError(f"{where}: {name} must be {_TOML_KINDS.get(type(default), type(default).__name__)}, "
                       f"got {given}")


def recipe_from_dict(data: dict[str, Any], where: str = "variant") -> Recipe:
    """A recipe from its dict form (a ``[[recipe]]`` table); unknown keys are errors, with did-you-mean."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a table with {', '.join(RECIPE_KEYS)}, got {data!r}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"{where}: {unknown[0]!r} is not a recipe key{did_you_mean(unknown[0], RECIPE_KEYS)}; "
                          f"allowed: {', '.join(RECIPE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: an inline variant needs a non-empty 'name'")
    if name != name.strip():
        raise RecipeError(f"{where}: variant name {name!r} has surrounding spaces (it is printed in terminals and "
                          "reports as it is)")
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is not None:
        import unicodedata

        what = unicodedata.name(bad, "a control character")
        raise RecipeError(f"{where}: variant name {name!r} holds U+{ord(bad):04X} ({what}), which does not print as "
                          "it is (names are printed in terminals and reports); use letters, digits, '-', '_' or a "
                          "plain space")
    if not isinstance(data.get("description", ""), str):
        raise RecipeError(f"{where}: 'description' must be a string, got {data['description']!r}")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise RecipeError(f"{where}: 'steps' must be a list of tables, got {steps!r}")
    built = tuple(step_from_dict(s, f"{where} {name!r} step {i}") for i, s in enumerate(steps))
    try:
        return Recipe(name=name, steps=built, description=data.get("description", ""))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
