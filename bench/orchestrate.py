"""Run a matrix: create or resume the run directory, build variants once, run cells, record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import __version__
from bench.cells import Cell
from bench.matrix import Matrix, expand, parse_matrix
from bench.results import (
    RUN,
    RunWriteError,
    append_record,
    failed_record,
    read_records,
    read_run,
    require_run_dir,
    utc_now,
    write_json_atomic,
)
from bench.runner import JOB_TIMEOUTS, cell_result_to_record
from optimize.errors import InputError
from optimize.registry import recipe_from_dict

RUN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)  # ASCII digits only: int() would take '１/２'
        if not match:
            raise InputError(f"--shard must look like i/n (e.g. 1/2), got {text!r}")
        i, n = int(match[1]), int(match[2])
        if not 1 <= i <= n:
            raise InputError(f"--shard {text}: need 1 <= i <= n")
        return cls(i, n)

    def select(self, cells: list[Any]) -> list[Any]:
        """Round-robin over the stable cell order: sizes differ by at most one, same on every machine."""
        return [c for k, c in enumerate(cells) if k % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def make_launcher(name: str, run_dir: Path, ray_address: str | None = None, logs_dir: Path | None = None):
    """The launcher called ``name``; Ray is imported only when asked for."""
    if name == "ray":
        from bench.launchers.ray import RayLauncher

        return RayLauncher(ray_address)
    if ray_address:
        raise InputError("--ray-address needs --launcher ray")
    from bench.launchers.local import LocalLauncher

    return LocalLauncher(logs_dir or run_dir / "logs")


def matrix_hash(matrix: Matrix) -> str:
    d = matrix.to_dict()
    d.pop("source", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_id(cell: Cell) -> str | None:
    """Identity of the stored artifact a cell needs; None when the recipe saves nothing."""
    recipe = cell.recipe
    if not recipe.saved_steps:
        return None
    payload = [cell.model, recipe.content_hash(recipe.saved_steps), cell.device]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def plan_run_dir(out: Path | None, matrix: Matrix) -> Path:
    """Where a new run goes: ``--out``, or ``reports/runs/STAMP-NAME`` (never outside ``reports/runs``)."""
    if out is not None:
        return Path(out)
    base = Path("reports") / "runs"
    run_dir = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{matrix.name}"
    if run_dir.resolve().parent != base.resolve():  # the matrix parser already refuses such names
        raise InputError(f"matrix name {matrix.name!r} would put the run outside {base}")
    return run_dir


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a directory that already holds a run, that is a file, or that holds anything else (the
    user's files, which a run would mix its own into). Called before the run's lock is taken and again
    while holding it: the lock file, and a run.json write of a run killed before it was whole, are a
    new run's own.
    """
    from bench.runlock import LOCK
    from optimize.atomic import TMP_SUFFIX

    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file, not a directory")
    if (run_dir / RUN).exists():
        raise InputError(f"--out {run_dir} already holds a run; use --resume {run_dir} or another directory")
    try:
        names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    except OSError as exc:
        raise InputError(f"--out {run_dir}: cannot list it ({exc.strerror or exc})") from None
    others = sorted(n for n in names if n != LOCK and not ((m := TMP_SUFFIX.search(n)) and n[:m.start()] == RUN))
    if others:
        raise InputError(f"--out {run_dir} exists and is not an empty directory (it holds {others[0]!r}"
                         f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); give a new or empty one")


def new_run_dir(out: Path | None, matrix: Matrix) -> Path:
    """Create the directory of a new run (without the lock; ``infermatrix run`` locks it first)."""
    run_dir = plan_run_dir(out, matrix)
    check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {run_dir} cannot be created: {exc.strerror or exc}") from None
    return run_dir


def start_run(matrix: Matrix, run_dir: Path, *, shard: Shard | None, launcher: str,
              environment: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    run = {
        "schema_version": RUN_SCHEMA_VERSION,
        "infermatrix_version": __version__,
        "matrix": matrix.to_dict(),
        "matrix_hash": matrix_hash(matrix),
        "shard": str(shard) if shard else None,
        "launcher": launcher,
        "environment": environment,
        "started": utc_now(),
        "ended": None,
        **(extra or {}),
    }
    write_run_json(run_dir, run, "the run's start")
    return run


def resume_run(run_dir: Path, shard: Shard | None = None) -> tuple[Matrix, dict[str, Any]]:
    """The matrix and run.json of ``run_dir``; a different ``--shard`` than the run's is refused.

    Call with the run's lock held: a merged run's ``missing_shards`` are settled against its records first.
    """
    require_run_dir(run_dir, "--resume")
    run = read_run(run_dir)
    if isinstance(run.get("ab"), dict):  # its worktree is gone, and its cells ran interleaved with the other side's
        raise InputError(f"--resume {run_dir}: it is the {run['ab'].get('side')} side of an 'infermatrix ab' job, "
                         "which resumes only as a whole: run the job again")
    m = dict(run["matrix"])
    source = m.pop("source", str(run_dir))
    for key in ("eval_text", "tokenizer"):
        if m.get(key) is None:
            m.pop(key, None)
    matrix = parse_matrix(m, source if isinstance(source, str) else str(run_dir))
    recorded = run.get("shard")
    if shard is not None and str(shard) != (recorded or "1/1"):
        raise InputError(f"--resume {run_dir} --shard {shard}: the run was started as "
                         f"{'shard ' + recorded if recorded else 'a whole matrix (no shard)'}; resume it with "
                         f"{'--shard ' + recorded if recorded else 'no --shard'} or start a new run")
    settled = settle_missing_shards(run_dir, run)
    if settled != run:  # a resume stopped after recording the missing shards' cells, before run.json said so
        write_run_json(run_dir, settled, "the shards still missing")
    return matrix, settled


# Paths a report's host may not have, taken out before the matrix is checked; a cell's identity holds none
# of them but the model's name (a local model directory is checked for its config.json).
_HOST_PATHS = {"eval_text": None, "tokenizer": None, "prompt_source": "auto"}
_ANY_MODEL = ["builtin:pycode"]  # also a matrix's default models


def unrecorded_cells(run: dict[str, Any], records: list[dict[str, Any]]) -> list[Cell] | None:
    """The cells of the run's matrix (its shard's, for a shard run) with no record, in matrix order.

    None when run.json cannot say which cells its matrix holds (see ``run_cells``).
    """
    cells = run_cells(run)
    if cells is None:
        return None
    seen = {r.get("cell_id") for r in records}
    return [c for c in cells if c.cell_id not in seen]


def run_cells(run: dict[str, Any]) -> list[Cell] | None:
    """The cells of the run's matrix (its shard's, for a shard run), in matrix order.

    Expanded from run.json alone, devices resolved as the run resolved them (its torch probe), so it
    answers on any host. None when run.json cannot say: a hand-made or older description whose matrix
    does not hash to its ``matrix_hash``, or an ``auto`` device with no recorded probe.
    """
    try:
        m = dict(run["matrix"])
        m.pop("source", None)
        kept = {k: m.pop(k, None) for k in _HOST_PATHS}
        models = m.pop("models", _ANY_MODEL)
        matrix = parse_matrix({**m, "models": _ANY_MODEL}, "run.json")
        matrix = dataclasses.replace(matrix, models=tuple(models),
                                     **{k: v if v is not None else _HOST_PATHS[k] for k, v in kept.items()})
        if run.get("matrix_hash") != matrix_hash(matrix):
            return None
        torch_env = (run.get("environment") or {}).get("torch") or {}
        if "cuda_available" in torch_env:
            from bench.env import device_resolver

            resolve = device_resolver(torch_env)
        elif "auto" in matrix.devices:
            return None
        else:
            def resolve(device: str) -> str:
                return device
        cells = expand(matrix, resolve)
        if run.get("shard"):
            cells = Shard.parse(run["shard"]).select(cells)
    except (InputError, KeyError, TypeError, ValueError):
        return None
    return cells


def unrecorded_count(missing: list[Cell], records: list[dict[str, Any]]) -> str:
    """'3 of 10 cells have no record', of ``unrecorded_cells``'s answer and the records it was given."""
    return f"{len(missing)} of {len(missing) + len({r.get('cell_id') for r in records})} cells have no record"


def check_records_belong(run_dir: Path, all_cells: list[Cell], shard_cells: list[Cell],
                         shard: Shard | None) -> None:
    """Refuse to resume a directory whose results.jsonl holds cells of another matrix or another shard."""
    all_ids, mine = {c.cell_id for c in all_cells}, {c.cell_id for c in shard_cells}
    for rec in read_records(run_dir, latest_only=False):
        cid = rec["cell_id"]
        if cid not in all_ids:
            raise InputError(f"{run_dir}/results.jsonl holds cell {cid} ({rec.get('model')}, {rec.get('variant')}), "
                             f"which is not a cell of {RUN}'s matrix: the records belong to another run")
        if cid not in mine:
            raise InputError(f"{run_dir}/results.jsonl holds cell {cid}, which is not in shard {shard}: the "
                             "records belong to another shard")


def plan_cells(matrix: Matrix, run_dir: Path, shard: Shard | None,
               resolve_device=None) -> tuple[list[Cell], Counter, list[Cell]]:
    """The shard's cells, the ok rounds recorded per cell id, and the cells still to run in ``run_dir``."""
    from bench.results import repair_torn_tail

    all_cells = expand(matrix, resolve_device)
    cells = shard.select(all_cells) if shard else all_cells
    repair_torn_tail(run_dir)  # a crash mid-append: move the fragment aside before anything is appended
    check_records_belong(run_dir, all_cells, cells, shard)
    ok_rounds = Counter(r["cell_id"] for r in read_records(run_dir, latest_only=False) if r["status"] == "ok")
    return cells, ok_rounds, [c for c in cells if ok_rounds[c.cell_id] < matrix.measure.rounds]


def execute(matrix: Matrix, run_dir: Path, launcher, *, shard: Shard | None = None,
            on_event: Callable[[str, dict[str, Any]], None] = lambda kind, info: None,
            cache_dir: str | None = None, resolve_device=None, plan=None) -> list[dict[str, Any]]:
    """Run every cell of ``matrix`` not yet recorded ``ok`` in ``run_dir``; returns the final records.

    Variants are built first, once each, in build jobs of their own; a cell whose build
    failed or was skipped gets that outcome without running. ``plan`` is ``plan_cells``'s answer
    when the caller has it already (a resume reads the run's records once).
    """
    cells, ok_rounds, todo = plan or plan_cells(matrix, run_dir, shard, resolve_device)
    todo = [dataclasses.replace(c, cache_dir=cache_dir) for c in todo]
    builds: dict[str, dict[str, Any]] = {}
    for c in todo:
        bid = build_id(c)
        if bid and bid not in builds:
            builds[bid] = build_job(bid, c)
    references: dict[str, dict[str, Any]] = {}
    for c in todo:
        if c.drift:
            drift = dataclasses.asdict(c.drift)
            rid = hashlib.sha256(json.dumps([c.model, c.device, drift]).encode()).hexdigest()[:16]
            references.setdefault(rid, {"reference_id": rid, "model": c.model, "device": c.device, "drift": drift,
                                        "eval_text": c.eval_text, "trust_remote_code": c.trust_remote_code,
                                        "cache_dir": cache_dir, "tokenizer": c.tokenizer,
                                        "prompt_source": c.prompt_source})
    outcomes: dict[str, dict[str, Any]] = _already_stored(builds, references, cache_dir)
    rounds_left = sum(matrix.measure.rounds - ok_rounds[c.cell_id] for c in todo)
    on_event("plan", {"cells": len(cells), "todo": rounds_left, "done": len(cells) - len(todo),
                      "builds": len(set(builds) - set(outcomes)), "references": len(set(references) - set(outcomes))})
    for bid in outcomes:
        if bid in builds:
            on_event("build", {"variant": builds[bid]["variant"]["name"], "status": "ok", "reused": True,
                               "counted": False})
    timeout = matrix.measure.timeout_s
    devices = sorted({c.device for c in todo}) if matrix.measure.roofline else []
    ceilings = _ceilings(run_dir, launcher, devices, on_event, matrix.measure.threads)
    todo = [dataclasses.replace(c, ceilings=ceilings.get(c.device)) for c in todo]
    pending_refs = [r for rid, r in references.items() if rid not in outcomes]
    for spec, result in launcher.run([("reference", r, timeout) for r in pending_refs]):
        on_event("reference", {"model": spec["model"], "status": result["status"], "error": result.get("error"),
                               "reference_s": result.get("reference_s")})
    pending_builds = [b for bid, b in builds.items() if bid not in outcomes]
    for spec, result in launcher.run([("build", b, timeout) for b in pending_builds]):
        outcomes[spec["build_id"]] = result
        on_event("build", {"variant": spec["variant"]["name"], "status": result["status"],
                           "reused": result.get("reused"), "build_s": result.get("build_s")})
    runnable = []
    for c in todo:
        outcome = outcomes.get(build_id(c) or "")
        if outcome and outcome["status"] != "ok":
            record = failed_record(c, f"build: {outcome['error']}")
            record["status"] = outcome["status"]
            append_record(run_dir, record)
            on_event("cell", record)
        else:
            runnable.append(c)
    by_id = {c.cell_id: c for c in runnable}
    jobs = [("cell", c.to_dict(), timeout) for c in _rounds(runnable, ok_rounds, matrix.measure)]
    for spec, result in launcher.run(jobs):
        cell = by_id[spec["cell_id"]]
        record = cell_result_to_record(cell, result)
        if matrix.measure.rounds > 1:
            record["round"] = spec["round"]
        if outcome := outcomes.get(build_id(cell) or ""):
            record.setdefault("build", {}).update(build_job_s=outcome.get("build_s"), built_now=not outcome["reused"])
        append_record(run_dir, record)
        on_event("cell", record)
    from bench.rounds import cell_records

    ids = {c.cell_id for c in cells}
    return cell_records([r for r in read_records(run_dir, latest_only=False) if r["cell_id"] in ids],
                        matrix.measure.rounds)


def build_job(bid: str, cell: Cell) -> dict[str, Any]:
    """The job that builds (or finds stored) the artifact ``cell``'s recipe saves."""
    return {"build_id": bid, "model": cell.model, "variant": cell.recipe.to_dict(), "device": cell.device,
            "trust_remote_code": cell.trust_remote_code, "cache_dir": cell.cache_dir, "tokenizer": cell.tokenizer,
            "prompt_source": cell.prompt_source}


def _rounds(cells: list[Cell], ok_rounds: Counter, measure) -> list[Cell]:
    """The cell jobs of all rounds still to run, each round in its own shuffled order."""
    if measure.rounds == 1:
        return cells
    rng = random.Random(measure.seed)
    jobs = []
    for r in range(measure.rounds):
        batch = [dataclasses.replace(c, round=r) for c in cells if ok_rounds[c.cell_id] <= r]
        rng.shuffle(batch)
        jobs += batch
    return jobs


def _ceilings(run_dir: Path, launcher, devices: list[str], on_event, threads: int) -> dict[str, Any]:
    """Measured roofline ceilings per device, stored in run.json (kept from the first attempt on resume).

    Measured on the cells' thread count (``[measure] threads``; 0: torch's default), so a cell's
    fraction compares it with what its own threads can reach; stored ceilings taken on other
    threads are measured again.
    """
    run = read_run(run_dir)
    known = {d: c for d, c in (run.get("roofline") or {}).items()
             if not threads or c.get("torch_threads") in (None, threads)}
    missing = [d for d in devices if d not in known]
    jobs = [("roofline", {"device": d, "threads": threads}, JOB_TIMEOUTS.roofline_s) for d in missing]
    for spec, result in launcher.run(jobs):
        if result["status"] == "ok":
            known[spec["device"]] = result["ceilings"]
            c = result["ceilings"]
            on_event("roofline", {"device": spec["device"], "bandwidth_gbps": c["memory"]["bandwidth_gbps"],
                                  "tflops": c["matmul"]["float32"]["tflops"]})
        else:
            on_event("roofline", {"device": spec["device"], "error": result["error"]})
    if missing:
        run = read_run(run_dir)
        run["roofline"] = known
        write_run_json(run_dir, run, "the roofline ceilings")
    return known


def _already_stored(builds: dict[str, dict], references: dict[str, dict], cache_dir: str | None) -> dict[str, dict]:
    """Outcomes of the build and reference jobs whose results are already stored (no process needed)."""
    from bench.metrics.drift import REFERENCE_JSON, DriftConfig, reference_path
    from optimize.models import default_cache_dir, peek_model
    from optimize.store import VariantStore

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    store = VariantStore(cache)
    found: dict[str, dict] = {}
    for bid, job in builds.items():
        ref = peek_model(job["model"], cache)
        if ref is not None:
            path = store.root / store.key(ref, recipe_from_dict(job["variant"]), job["device"])
            if store.stored(path) is not None:  # verified against its checksums, else rebuilt by a build job
                found[bid] = {"status": "ok", "reused": True, "path": str(path), "build_s": 0.0}
    for rid, job in references.items():
        ref = peek_model(job["model"], cache)
        if ref is not None:
            path = reference_path(ref, DriftConfig(**job["drift"]), cache, job["device"], job.get("eval_text"))
            if (path / REFERENCE_JSON).exists():
                found[rid] = {"status": "ok", "path": str(path)}
    return found


def finish_run(run_dir: Path) -> None:
    """Set ``ended``; a merged run's ``missing_shards`` keep only the shards still lacking records (one write)."""
    run = settle_missing_shards(run_dir, read_run(run_dir))
    run["ended"] = utc_now()
    write_run_json(run_dir, run, "the run's end; --resume writes it")


def write_run_json(run_dir: Path, run: dict[str, Any], what: str) -> None:
    """``run`` as ``run_dir``'s run.json, written whole; a write the disk or the folder refuses is a
    ``RunWriteError`` that says what the write was for, never a traceback (it is no bug).
    """
    path = run_dir / RUN
    try:
        write_json_atomic(path, run)
    except OSError as exc:
        raise RunWriteError(f"could not write {path} ({what}): {exc.strerror or exc}") from None


def settle_missing_shards(run_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """``run`` (run.json of ``run_dir``) with ``missing_shards`` narrowed to the shards whose cells still lack
    a record, the key dropped when none does: a resume of a merged run records the cells of the shards it
    was merged without, and report, select and history read the key as "these cells have no record".
    """
    if not run.get("missing_shards"):
        return run
    still = shards_still_missing(run, read_records(run_dir))
    settled = {k: v for k, v in run.items() if k != "missing_shards"}
    return {**settled, "missing_shards": still} if still else settled


def shards_still_missing(run: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The run's ``missing_shards`` that still have a cell without a record in ``records``.

    A resume of a merged run records the cells of the shards it was merged without; a shard whose
    every cell has its record (ok or failed, as ``unrecorded_cells`` counts) is no longer missing.
    Where run.json cannot say which cells its matrix holds, every listed shard stays listed.
    """
    listed = list(run.get("missing_shards") or [])
    cells = run_cells(run) if listed and not run.get("shard") else None
    if cells is None:
        return listed
    seen = {r.get("cell_id") for r in records}
    still = []
    for text in listed:
        try:
            shard = Shard.parse(str(text))
        except InputError:  # not a shard this version wrote: kept as it was
            still.append(text)
            continue
        if any(c.cell_id not in seen for c in shard.select(cells)):
            still.append(text)
    return still
