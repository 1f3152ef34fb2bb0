"""What runs inside one cell's process: load the variant, measure, write the record.

Usage (by the runner only): ``python -m bench.cell CELL.json RESULT.json``. A build job
(``--build``) only builds the variant's stored artifact, in a process of its own so that
build memory never shows in a cell's figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import job_phase
from bench.results import new_record, utc_now, write_json_atomic
from optimize.errors import InputError, NotApplicable

if TYPE_CHECKING:
    from bench.cells import Cell


def error_tail(exc: BaseException, lines: int = 12) -> str:
    """The traceback's last ``lines`` lines; an exception message longer than that is kept from its start.

    Bad input (``InputError``) is its message alone: it names the parameter and the fix, and a traceback
    into the harness (or its module path, ``optimize.errors.InputError:``) only hides that.
    """
    if isinstance(exc, InputError):
        return str(exc)
    text = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    own = "".join(traceback.format_exception_only(exc)).rstrip().splitlines()
    return "\n".join(own[:lines] if len(own) >= lines else text[-lines:])


def _seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def build(job: dict[str, Any]) -> dict[str, Any]:
    """Build the stored artifact of ``job``'s recipe; returns the build outcome."""
    from optimize.models import resolve_model
    from optimize.recipe import Recipe
    from optimize.registry import recipe_from_dict
    from optimize.store import VariantStore

    t0 = time.perf_counter()
    job_phase.enter("building the variant")
    try:
        ref = resolve_model(job["model"], _cache(job), job.get("tokenizer"))
        recipe = recipe_from_dict(job["variant"])
        store = VariantStore(_cache(job))
        artifact = store.get_or_build(ref, recipe, job["device"], job["trust_remote_code"])
        # The artifact is keyed by the saved steps alone (prune-2of4 and prune-2of4-fp16 share one), so it
        # is validated as that: a runtime step that cannot run here (fp16 on a CPU) skips the cells that
        # load it, never the artifact and every other recipe built on it.
        artifact_recipe = Recipe(name=recipe.name, steps=recipe.saved_steps)
        validation = None if artifact.reused else validate_build(ref, artifact_recipe, job["device"], store, job)
        return {"status": "ok", "reused": artifact.reused, "path": str(artifact.path), "validation": validation,
                "build_s": time.perf_counter() - t0, "manifest": artifact.manifest}
    except Exception as exc:  # a technique that crashed: recorded for every cell of the variant
        return {**build_outcome(exc), "build_s": time.perf_counter() - t0}


def build_outcome(exc: Exception) -> dict[str, str]:
    """A build's status and error for what it raised: skipped where the technique does not apply here."""
    if isinstance(exc, NotApplicable):
        return {"status": "skipped", "error": str(exc)}
    return {"status": "failed", "error": error_tail(exc)}


VALIDATION_PROMPTS, VALIDATION_PROMPT_TOKENS, VALIDATION_NEW_TOKENS = 2, 16, 8


def validate_build(ref, recipe, device: str, store, job: dict[str, Any]) -> dict[str, Any]:
    """A newly built variant must generate; a lossless one must reproduce the reference's greedy tokens.

    On failure the artifact is removed (so the next run rebuilds and re-checks it) and the
    build fails with the reason.
    """
    import shutil

    import torch

    from bench.generation import greedy_generate
    from bench.prompts import prompt_ids
    from optimize.errors import RecipeError
    from optimize.recipe import Recipe
    from optimize.store import load_variant

    state, artifact = load_variant(ref, recipe, device, store, job["trust_remote_code"])
    prompts, _ = prompt_ids(ref, state.model.config.vocab_size, VALIDATION_PROMPTS, VALIDATION_PROMPT_TOKENS,
                            eval_text=job.get("eval_text"), trust_remote_code=job["trust_remote_code"],
                            source=job.get("prompt_source", "auto"), cache_dir=_cache(job))
    tokens = greedy_generate(state, prompts, VALIDATION_NEW_TOKENS).cpu()
    result = {"generates": True, "lossless": recipe.lossless}
    if recipe.lossless:
        reference, _ = load_variant(ref, Recipe(name="fp32"), device, store, job["trust_remote_code"])
        same = torch.equal(tokens, greedy_generate(reference, prompts, VALIDATION_NEW_TOKENS).cpu())
        result["matches_reference_tokens"] = same
        if not same:
            shutil.rmtree(artifact.path, ignore_errors=True)
            raise RecipeError(f"variant {recipe.name!r} is lossless by construction but its greedy tokens differ "
                              "from the reference's on the validation prompts")
    return result


def reference(job: dict[str, Any]) -> dict[str, Any]:
    """Run the fp32 reference pass that drift compares against (cached on disk)."""
    from bench.metrics.drift import DriftConfig, ensure_reference
    from bench.metrics.drift_config import random_weights_skip
    from optimize.models import default_cache_dir, resolve_model

    t0 = time.perf_counter()
    job_phase.enter("the fp32 reference pass for drift")
    try:
        ref = resolve_model(job["model"], _cache(job), job.get("tokenizer"))
        skipped = random_weights_skip(DriftConfig(**job["drift"]).random_weights, ref)
        if skipped:
            raise NotApplicable(skipped)
        path = ensure_reference(ref, DriftConfig(**job["drift"]), _cache(job) or default_cache_dir(), job["device"],
                                job.get("eval_text"), job["trust_remote_code"])
        info = json.loads((path / "reference.json").read_text())
        return {"status": "ok", "path": str(path), "reference_s": time.perf_counter() - t0,
                "reference_perplexity": info.get("reference_perplexity")}
    except NotApplicable as exc:  # e.g. no tokenizer: the cells record why drift was skipped
        return {"status": "skipped", "error": str(exc), "reference_s": time.perf_counter() - t0}
    except Exception as exc:
        return {"status": "failed", "error": error_tail(exc), "reference_s": time.perf_counter() - t0}


def _cache(job: dict[str, Any]) -> Path | None:
    return Path(job["cache_dir"]) if job.get("cache_dir") else None


def measure(job: dict[str, Any], provisional: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one cell (its job file, ``Cell.to_dict``) and return its record (status ok, skipped or failed).

    ``provisional`` is given the record as it stands once the speed and memory figures are taken,
    before drift is scored (see ``bench.job_phase``).
    """
    from bench.cells import Cell
    from bench.metrics import memory

    t_start = time.perf_counter()
    cell = Cell.from_dict(job)
    _fill_caches(cell)
    baseline_rss = memory.rss_bytes()
    record = new_record(cell)
    record["started_at"] = utc_now()
    try:
        record.update(_measure(cell, record, baseline_rss, t_start, provisional))
    except NotApplicable as exc:
        record.update(status="skipped", error=str(exc))
    except Exception as exc:  # any failure of the measured code becomes a failed record
        record.update(status="failed", error=error_tail(exc))
    record["timing_s"].setdefault("total", time.perf_counter() - t_start)  # an ok record's is its phases' sum
    return record


def _fill_caches(cell: Cell) -> None:
    """Resolve the model and encode the evaluation text in a forked child, which keeps both in the cache.

    On a cold cache that is one-time work in the middle of the cell (a synthetic model written,
    the built-in text encoded: +48 MiB on the first cell's serving peak, measured): done in a
    child, it never shows in this process's memory figures, and the cell reads both back. The
    child's failure is left to the cell, which meets the same error and records it. The wait
    blocks on the child's exit; it is in this job's process group, so a timeout kills it too.
    A job process has one thread; where ``measure`` is called in a process with others (a
    lock one of them holds would never be released in a forked child), nothing is forked.
    """
    import threading

    if threading.active_count() > 1:
        return
    job_phase.enter("preparing the model and its prompts", "in a child process: cache fills stay out of the figures")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from optimize.models import encoded_eval_text, resolve_model

            ref = resolve_model(cell.model, cell.cache_path, cell.tokenizer)
            if cell.prompt_source != "random" and ref.tokenizer is not None:
                encoded_eval_text(ref, cell.eval_text, cell.trust_remote_code, cell.cache_path)
            code = 0
        except BaseException:  # noqa: BLE001  (the cell meets it again and records it)
            pass
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def _measure(cell: Cell, record: dict[str, Any], baseline_rss: int, t_start: float,
             provisional: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load the variant, then each measurement in turn: latency, memory, roofline, drift."""
    import torch

    from bench.metrics import memory_cell
    from bench.metrics.roofline_cell import add_roofline

    _seed(cell.measure.seed)
    if cell.measure.threads:
        torch.set_num_threads(cell.measure.threads)  # before loading: every kernel then runs on these threads
    state, artifact, load_s = _load(cell, record)
    load_peaks = memory_cell.close_load_window(cell.device)
    metrics, samples, method = _measure_latency(state, cell, record)
    metrics["rss_baseline_bytes"] = baseline_rss
    job_phase.enter("reading memory and roofline figures")
    # Memory figures are read before drift runs: drift's own buffers must not count.
    figures, missing = memory_cell.measure_memory(cell.device, baseline_rss, load_peaks)
    metrics.update(figures)
    add_roofline(state, cell, metrics, method, artifact.manifest)
    method.update(memory=memory_cell.memory_method(cell.device, metrics), torch_threads=torch.get_num_threads(),
                  **missing)
    if state.backend == "onnxruntime":
        from optimize.export.onnx import intra_op_threads

        method["ort_intra_op_threads"] = intra_op_threads(state.model)
        if cell.device == "cuda":
            method["memory"] = memory_cell.onnx_runtime_cuda_memory(metrics)
    skipped = _drift_skip_reason(state, cell) if cell.drift else None
    if provisional is not None and cell.drift and skipped is None:
        # the runner adds the drift it did not finish to its drift and total
        provisional({**record, **_ok_result(state, artifact, metrics, samples, method, load_s, 0.0, t_start)})
    drift_s = _add_drift(state, cell, artifact.path, record, metrics, method, skipped)
    return _ok_result(state, artifact, metrics, samples, method, load_s, drift_s, t_start)


def _ok_result(state, artifact, metrics, samples, method, load_s: float, drift_s: float,
               t_start: float) -> dict[str, Any]:
    """The fields of a measured cell's record."""
    warmup = sum(samples["warmup_wall_s"])
    compiled = method.get("compiled_decode_step") or {}
    timing_extra = {"compile_and_capture": compiled["compile_and_capture_s"]} if compiled else {}
    warmup += compiled.get("compile_call_wall_s", 0.0)
    elapsed = time.perf_counter() - t_start
    return {
        "status": "ok",
        "metrics": metrics,
        "samples": samples,
        "method": method,
        "labels": state.labels,
        "build": {"reused": artifact.reused, "manifest_build_s": artifact.manifest.get("build_s"),
                  "reports": state.reports},
        # The phases add up to the total, read once: overhead is the rest (preparing the model and prompts,
        # the store lookup, the memory and roofline readings); compile_and_capture is a part of warmup.
        "timing_s": {"load": load_s, "warmup": warmup, "measure": metrics["measured_wall_s"], "drift": drift_s,
                     "overhead": elapsed - load_s - warmup - metrics["measured_wall_s"] - drift_s,
                     "total": elapsed, **timing_extra},
    }


def _load(cell: Cell, record: dict[str, Any]):
    """Build (or reuse) and load the cell's variant: (state, artifact, load seconds)."""
    from bench.metrics import memory
    from optimize.models import resolve_model
    from optimize.store import VariantStore, load_variant

    job_phase.enter("preparing the variant", "model resolved, variant fetched from the store or built")
    ref = resolve_model(cell.model, cell.cache_path, cell.tokenizer)
    record["model_info"] = ref.to_dict()
    if cell.device == "cuda":
        memory.reset_cuda_peaks()
    store = VariantStore(cell.cache_path)
    built = store.get_or_build(ref, cell.recipe, cell.device, cell.trust_remote_code)  # checksums verified first
    job_phase.enter("loading the variant")
    t0 = time.perf_counter()
    state, artifact = load_variant(ref, cell.recipe, cell.device, store, cell.trust_remote_code)
    return state, dataclasses.replace(artifact, reused=built.reused), time.perf_counter() - t0


def _measure_latency(state, cell: Cell, record: dict[str, Any]):
    """Time the cell's scenario under the machine-load monitor: (metrics, samples, method)."""
    from bench.metrics import memory
    from bench.metrics.load import machine_load, noise_mark
    from bench.metrics.roofline_cell import kv_bytes_per_token
    from bench.prompts import prompt_ids
    from bench.scenarios import Footprint

    scenario, repeat = cell.scenario, cell.measure.repeat
    check_context(state.model.config, scenario)
    footprint = Footprint(memory.weights_bytes(state), kv_bytes_per_token(state, scenario))
    check_memory(state, scenario, footprint)
    prompts, prompt_source = prompt_ids(state.ref, state.model.config.vocab_size, scenario.batch_size,
                                        scenario.prompt_tokens, cell.measure.seed, cell.eval_text,
                                        cell.trust_remote_code, cell.prompt_source, cell.cache_path)
    with machine_load() as record["load"]:
        metrics, samples, method = scenario.run(state, prompts, repeat, footprint)
    record.update(noise_mark(samples, repeat.target_rel_ci))
    metrics["weights_bytes"] = footprint.weights_bytes
    metrics["kv_cache_bytes_per_token"] = footprint.kv_bytes_per_token
    method["prompt_source"] = prompt_source
    return metrics, samples, method


def check_memory(state, scenario, footprint) -> None:
    """A workload whose prompt ids, KV cache and logits alone exceed the memory available on its device (the
    weights are loaded already) is skipped with the figures, never run into the out-of-memory killer.
    """
    from bench.scenarios.sweeps import available_bytes, estimated_decode_bytes

    b, p = scenario.batch_size, scenario.prompt_tokens
    need = estimated_decode_bytes(state, scenario, 0, footprint.kv_bytes_per_token) + b * p * 8  # int64 ids
    free = available_bytes(state.device)
    if need > free:
        raise NotApplicable(f"batch {b} x prompt {p} + {scenario.new_tokens} new tokens: the prompt, KV cache and "
                            f"logits alone need an estimated {need / 2**30:.1f} GiB, more than the "
                            f"{free / 2**30:.1f} GiB available on {state.device}")


def check_context(config, scenario) -> None:
    """A scenario longer than the model's context is skipped with the reason, never run past it."""
    limit = getattr(config, "max_position_embeddings", None)
    needed = scenario.prompt_tokens + scenario.new_tokens
    if isinstance(limit, int) and needed > limit:
        raise NotApplicable(f"prompt_tokens {scenario.prompt_tokens} + new_tokens {scenario.new_tokens}"
                            f" = {needed} exceeds the model's context of {limit} positions (max_position_embeddings)")


def _drift_skip_reason(state, cell: Cell) -> str | None:
    """Why this cell's drift is not scored (the timings stand), or None."""
    from bench.metrics.drift_config import random_weights_skip
    from optimize.models import no_tokenizer_reason

    if state.ref.tokenizer is None:  # drift scores text
        return no_tokenizer_reason(state.ref)
    return random_weights_skip(cell.drift.random_weights, state.ref)


def _add_drift(state, cell: Cell, artifact_path, record, metrics, method, skipped: str | None) -> float:
    """Accuracy drift after the speed and memory figures are taken, so it cannot disturb them; ``skipped``
    is why it is not scored (``_drift_skip_reason``), or None.
    """
    if not cell.drift:
        return 0.0
    from bench.metrics.drift_cell import cell_drift

    if skipped:
        record["drift_skipped"] = skipped
        method["drift"] = {"skipped": skipped}
        return 0.0

    t0 = time.perf_counter()
    job_phase.enter("scoring drift")
    try:
        drift = cell_drift(state, cell, artifact_path)
    except NotApplicable:
        raise
    except Exception as exc:  # timing figures stay valid; the drift failure is recorded, not hidden
        record["drift_ok"] = False
        record["drift_error"] = error_tail(exc)
        return time.perf_counter() - t0
    metrics.update(drift["metrics"])
    method["drift"] = drift["method"]
    record["drift_ok"] = drift["drift_ok"]
    record["drift_violations"] = drift["violations"]
    return time.perf_counter() - t0


def roofline(job: dict[str, Any]) -> dict[str, Any]:
    """Measure the device's bandwidth and matmul ceilings in a process of their own."""
    import torch

    from bench.metrics.roofline import measure_ceilings

    job_phase.enter("measuring the device's ceilings")
    try:
        if job.get("threads"):
            torch.set_num_threads(job["threads"])  # the cells' threads: the ceiling their fractions divide by
        return {"status": "ok", "ceilings": measure_ceilings(job["device"])}
    except Exception as exc:
        return {"status": "failed", "error": error_tail(exc)}


def probe(job: dict[str, Any]) -> dict[str, Any]:
    from bench.env import recorded_env_vars, torch_info

    # env_vars: what a job process sees, which must be what the run records from the process that started it.
    return {"status": "ok", "torch": torch_info(), "env_vars": recorded_env_vars()}


JOBS = {"--build": build, "--reference": reference, "--roofline": roofline, "--probe": probe}


def main(argv: list[str], notes: Sequence[str] = ()) -> int:
    """Run the job ``argv`` names ([--kind] SPEC OUT) and write its result to OUT, ``notes`` in its labels."""
    run = JOBS.get(argv[0], measure) if argv else measure
    spec_path, out_path = (argv[1:] if argv[0] in JOBS else argv)[:2]
    job = json.loads(Path(spec_path).read_text())

    def labelled(result: dict[str, Any]) -> dict[str, Any]:
        return {**result, "labels": [*result.get("labels", []), *notes]} if notes else result

    keep = job_phase.provisional_path(Path(out_path))
    if run is measure:
        result = measure(job, lambda provisional: write_json_atomic(keep, labelled(provisional)))
    else:
        result = run(job)
    job_phase.enter("writing the result")
    write_json_atomic(Path(out_path), labelled(result))
    keep.unlink(missing_ok=True)  # the result is whole: a death from here on must not read as drift's
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
