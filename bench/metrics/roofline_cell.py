"""The roofline inside a cell: the bytes its decode reads per step, its prefill's FLOPs, and the
fractions of the run's measured ceilings they reach (``bench.metrics.roofline`` holds the arithmetic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.metrics.roofline import cell_roofline
from optimize.errors import exception_line

if TYPE_CHECKING:
    from bench.cells import Cell


def add_roofline(state, cell: Cell, metrics: dict[str, Any], method: dict[str, Any],
                 manifest: dict[str, Any] | None = None) -> None:
    """Achieved fractions of the run's measured ceilings: prefill FLOP/s, and decode bandwidth where the cell decoded.

    Optional: a failure is a note in the record, never the loss of the timings already taken.
    """
    if not cell.ceilings or "prefill_tokens_per_s" not in metrics:
        return
    try:
        figures, logits = roofline_figures(state, cell, metrics, manifest)
        metrics.update(figures)
        parts = [f"prefill FLOPs counted by torch.utils.flop_counter on the architecture, {logits}"]
        ceilings, computes_in = figures["roofline_ceilings"], cell.recipe.matmul_dtype(cell.device)
        if "matmul_dtype" in ceilings:
            parts.append(f"prefill fraction of the fastest measured {ceilings['matmul_dtype']} matmul "
                         f"({ceilings['matmul_backend']}); the variant computes in {computes_in} here")
        else:
            parts.append(f"no prefill fraction: no {computes_in} matmul could be measured on this device")
        if "roofline_fraction" in figures:
            kv = "KV shape read off a real cache"
            if state.generate_kwargs.get("cache_implementation") == "quantized":
                kv += "; a quantized cache's bytes, scales and full-precision tail included, held over this decode"
            parts.insert(0, "decode bytes/step = weights (less an untied input embedding) + batch x mean context x "
                            f"KV bytes/token ({kv})")
        method["roofline"] = "; ".join(parts)
    except Exception as exc:
        method["roofline_error"] = f"roofline not computed: {exception_line(exc)}"
        state.labels.append(method["roofline_error"])


def kv_bytes_per_token(state, scenario) -> float:
    """Bytes the variant's KV cache stores per token of context (every layer's, one sequence's).

    At the cache's stored element size (the graph's past inputs or the first float weight); for a
    quantized cache, what it holds over ``scenario``'s decode, scales and full-precision recent
    tokens included (``optimize.introspect.quantized_kv_bytes_per_token``); 0 for a variant that
    keeps no cache (``use_cache=False``: every step recomputes the prefix, and there is nothing to
    hold or to read).
    """
    if state.generate_kwargs.get("use_cache") is False:
        return 0.0
    geometry = kv_geometry(state)
    if state.generate_kwargs.get("cache_implementation") == "quantized":
        from optimize.introspect import quantized_kv_bytes_per_token

        return quantized_kv_bytes_per_token(state.model, geometry, state.generate_kwargs.get("cache_config") or {},
                                            scenario.prompt_tokens, scenario.new_tokens)
    return geometry.bytes_per_token(kv_element_bytes(state))


def kv_geometry(state):
    """KV-cache shape: off the graph's past inputs (ONNX) or a real one-token cache (torch)."""
    from optimize import introspect

    if state.backend == "onnxruntime":
        from optimize.export.onnx import onnx_kv_geometry

        return onnx_kv_geometry(state.onnx_dir, _ort_session(state))
    return introspect.kv_geometry(state.model)


def _ort_session(state):
    """The loaded ONNX Runtime session: the graph's inputs without parsing the file inside the measured window."""
    return getattr(state.model, "session", None)


def roofline_figures(state, cell: Cell, metrics: dict[str, Any],
                     manifest: dict[str, Any] | None = None) -> tuple[dict, str]:
    """The cell's roofline figures, and how its prefill's LM head was counted (the method's words)."""
    from bench.generation import last_logits_only
    from bench.metrics.memory import untied_embedding_bytes
    from optimize.introspect import prefill_flops

    embed = None
    if "decode_tokens_per_s" in metrics:
        try:
            embed = untied_embedding_bytes(state, manifest)
        except LookupError as exc:  # the estimate stays, counting the whole table as read, and says so
            state.labels.append(f"decode bandwidth counts the whole input embedding table as read: {exc}")
    read = {**metrics, "weights_bytes": metrics["weights_bytes"] - (embed or 0)}
    last_only = last_logits_only(state)
    logits = ("the LM head on the last position only (generate's logits_to_keep=1)" if last_only
              else "the LM head on every position (the model computes every position's logits)")
    scenario = cell.scenario
    shape = {"prefill_flops": prefill_flops(state.model.config, scenario.batch_size, scenario.prompt_tokens,
                                             cell.cache_path, last_logits_only=last_only)}
    out = cell_roofline(read, scenario.to_dict(), shape, cell.ceilings, cell.recipe.matmul_dtype(cell.device))
    if embed is not None:  # unknown: left out, and the label says the whole table was counted
        out["embedding_bytes_not_read"] = embed
    return out, logits


def kv_element_bytes(state) -> int:
    """Bytes per element of the KV cache: the graph's past-key inputs (ONNX), else the first float weight."""
    if state.backend == "onnxruntime":
        from optimize.export.onnx import onnx_kv_element_bytes

        return int(onnx_kv_element_bytes(state.onnx_dir, _ort_session(state)))  # whole bytes, as torch's
    return next(p for p in state.model.parameters() if p.is_floating_point()).element_size()
