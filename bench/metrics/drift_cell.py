"""Drift inside a cell: one measurement per variant, shared by that variant's cells.

Drift depends on the model, the recipe, the device and the library versions, not on the
timing scenario, so the result is stored beside the reference under a key of those and
reused by the variant's other cells (and by later runs with the same artifact). Records
say whether a figure was computed or reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.metrics.drift import ensure_reference, measure_drift
from optimize.atomic import write_atomic
from optimize.models import default_cache_dir

if TYPE_CHECKING:
    from bench.cells import Cell

# Figures copied into the record's metrics; the method dict goes to record["method"]["drift"].
DRIFT_METHOD_KEY = "drift_method"
# Bumped when a variant's figures change meaning: 2 = KV-cache variants scored through their cache;
# 3 = a variant with a decode loop of its own (static-kv compiled) scored through that loop.
SCORING_VERSION = 3


def _variant_key(reference: Path, cell: Cell, artifact_path: Path, batch_windows: int) -> str:
    from optimize.libraries import libraries
    from optimize.store import content_hash, library_versions

    # The artifact's content, not its directory name: a rebuilt or corrupted artifact gets its own figures.
    payload = {"reference": reference.name, "recipe": cell.recipe.content_hash(),
               "artifact": content_hash(artifact_path), "device": cell.device, "batch_windows": batch_windows,
               "scoring": [cell.drift.scoring, SCORING_VERSION],
               "versions": library_versions(libraries("drift"))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cell_drift(state, cell: Cell, artifact_path: Path) -> dict[str, Any]:
    """Drift metrics for the cell's loaded variant, computed once per variant.

    Returns:
        {"metrics": {...}, "method": {...}, "drift_ok": bool, "violations": [...], "reused": bool}.

    """
    cfg = cell.drift
    cache = cell.cache_path or default_cache_dir()
    reference = ensure_reference(state.ref, cfg, cache, cell.device, cell.eval_text, cell.trust_remote_code)
    stored = reference / "variants" / f"{_variant_key(reference, cell, Path(artifact_path), cfg.batch_windows)}.json"
    reused = stored.exists()
    if reused:
        result = json.loads(stored.read_text())
    else:
        result = measure_drift(state, reference, cfg)
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(stored, json.dumps(result, sort_keys=True))
    method = dict(result.pop(DRIFT_METHOD_KEY))
    method["computed_in_this_cell"] = not reused
    result["drift_meaningful"] = bool(state.ref.trained)  # random weights: mechanics only
    violations = cell.drift_budget.check(result)
    return {"metrics": result, "method": method, "drift_ok": not violations, "violations": violations,
            "reused": reused}
