"""``infermatrix run``: run a benchmark matrix and record every cell.

Flags narrow or replace parts of the matrix (comma lists, as llama-bench takes them);
flags left out keep the matrix file's values, whose defaults live in the config classes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from bench.commands import check_thread_count, folder, names, nonempty, output_dir
from bench.metrics.drift_config import PROTOCOLS
from optimize.errors import InputError


def _ints(flag: str):
    """Comma-separated integers, none left out (``1,,8``); their ranges are checked once, by the matrix, with
    the file's rules.
    """
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}")
        return values
    return parse


def _seconds(flag: str, positive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number of seconds {bound}, got {text!r}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", nargs="?", type=nonempty("MATRIX"),
                   help="matrix TOML file (default: the built-in default matrix)")
    p.add_argument("--model", type=names("--model", "model"),
                   help="model spec(s), comma-separated: builtin:pycode, synthetic:llama-134m, "
                        "a local HF directory or a hub id")
    p.add_argument("--variants", type=names("--variants", "variant"),
                   help="variant names, comma-separated (see 'infermatrix variants')")
    p.add_argument("--batch-size", type=_ints("--batch-size"), help="batch sizes, e.g. 1,8")
    p.add_argument("--prompt-tokens", type=_ints("--prompt-tokens"), help="prompt lengths in tokens, e.g. 128")
    p.add_argument("--new-tokens", type=_ints("--new-tokens"), help="generated tokens per request, e.g. 32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device (default: the matrix's, usually auto)")
    p.add_argument("--out", type=folder("--out"),
                   help="run directory to create (default: reports/runs/TIMESTAMP-NAME)")
    p.add_argument("--resume", type=folder("--resume"), metavar="DIR",
                   help="continue the run in DIR with the settings it was started with: skip cells recorded ok")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (deterministic, balanced; see 'merge')")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: cells one after another here; ray: each cell a Ray task (pip install '.[ray]')")
    p.add_argument("--ray-address", type=nonempty("--ray-address"),
                   help="an existing Ray cluster: HOST:PORT of its GCS, or ray://HOST:PORT (default: $RAY_ADDRESS, "
                        "else a local Ray instance)")
    p.add_argument("--warmup", type=int, help="warm-up runs per cell")
    p.add_argument("--min-reps", type=int, help="minimum measured repetitions per cell")
    p.add_argument("--max-reps", type=int, help="maximum measured repetitions per cell")
    p.add_argument("--budget-s", type=_seconds("--budget-s", positive=False),
                   help="time budget of the repetitions per cell, seconds")
    p.add_argument("--timeout-s", type=_seconds("--timeout-s", positive=True),
                   help="per-cell timeout, seconds (the cell's process is killed)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads per cell, torch's and ONNX Runtime's (default: the matrix's "
                        "[measure] threads; 0: torch's default)")
    p.add_argument("--no-drift", action="store_true", help="skip accuracy drift (speed and memory only)")
    p.add_argument("--drift-protocol", choices=PROTOCOLS,
                   help="which tokens drift scores: every token but each window's first (all-but-first, default), "
                        "or llama-perplexity's (BOS first where the tokenizer adds one, second half of each window "
                        "scored: perplexities comparable with llama.cpp's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own modelling code to run")
    p.add_argument("--tokenizer", type=nonempty("--tokenizer"), metavar="DIR",
                   help="tokenizer directory for models saved without one")
    p.add_argument("--prompt-source", choices=("auto", "eval-text", "random"),
                   help="prompts from the evaluation text, or seeded random ids within the vocabulary "
                        "(default auto: random only where the model has no tokenizer)")
    p.add_argument("--cache-dir", type=folder("--cache-dir", str),
                   help="variant store and model cache (default: $INFERMATRIX_CACHE or ~/.cache/infermatrix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar: plain lines for CI logs")
    p.add_argument("--no-report", action="store_true",
                   help="do not write report.md, report.html and results.csv into the run directory at the end")
    p.add_argument("--allow-env-mismatch", action="store_true",
                   help="with --resume: measure the remaining cells although this machine differs from where the run "
                        "started (CPU, GPUs, driver, threads, library versions); run.json records the difference and "
                        "compare withholds its verdicts on the run")
    p.add_argument("--logs-dir", type=folder("--logs-dir"), metavar="DIR",
                   help="where each job's spec, output and log go (default: the run directory's logs/)")


# A resumed run keeps what it was started with (run.json's matrix, the flags it was given then folded in):
# with --resume, a flag that would shape the matrix or move the run is refused, never ignored. These say how
# and where this invocation works, and apply: --shard is checked against the run's own.
RESUME_REFUSES = ("out", "model", "variants", "batch_size", "prompt_tokens", "new_tokens", "device", "warmup",
                  "min_reps", "max_reps", "budget_s", "timeout_s", "threads", "no_drift", "drift_protocol",
                  "trust_remote_code", "tokenizer", "prompt_source")
RESUME_APPLIES = ("shard", "launcher", "ray_address", "cache_dir", "logs_dir", "quiet", "no_report",
                  "allow_env_mismatch")


def check_resume_flags(args: argparse.Namespace) -> None:
    """Refuse, with ``--resume``, a matrix file and every flag in ``RESUME_REFUSES`` that was given."""
    if args.matrix:
        raise InputError("give either a matrix file or --resume DIR, not both")
    given = [f"--{dest.replace('_', '-')}" for dest in RESUME_REFUSES
             if getattr(args, dest) is not None and getattr(args, dest) is not False]
    if given:
        raise InputError(f"--resume {args.resume} keeps the settings the run was started with; it cannot take "
                         f"{', '.join(given)} (start a new run with --out to change them)")


def main(args: argparse.Namespace) -> int:
    from bench.orchestrate import check_new_run_dir, plan_run_dir
    from bench.runlock import RunLock

    if args.resume:
        check_resume_flags(args)
    shard = _shard(args)
    # settings whose faults would otherwise surface in every cell, or after run.json is written
    check_cache_dirs(args.cache_dir)
    if args.logs_dir is not None:
        output_dir(args.logs_dir, "--logs-dir")
    if args.ray_address and args.launcher != "ray":
        raise InputError("--ray-address needs --launcher ray")
    if args.launcher == "ray":  # Ray would retry an address that does not answer forever
        from bench.launchers.ray import check_address

        check_address(*((args.ray_address, "--ray-address") if args.ray_address else
                        (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")))
    if args.allow_env_mismatch and not args.resume:
        raise InputError("--allow-env-mismatch applies to --resume only (a new run has one environment)")
    if args.resume:
        from bench.results import require_run_dir

        require_run_dir(args.resume, "--resume")
        lock = RunLock(args.resume).acquire()  # held for the whole run, taken before anything else
        return locked(lock, lambda: _run(args, args.resume, shard, None))
    matrix = _matrix(args)
    run_dir = plan_run_dir(args.out, matrix)
    check_new_run_dir(run_dir)  # a finished run is refused before the lock, which would write into it
    lock = RunLock(run_dir).acquire()  # before probing: a second run on this directory exits 2 at once
    return locked(lock, lambda: _run(args, run_dir, shard, matrix))  # _run checks again, under the lock


def locked(lock, run) -> int:
    """``run()`` while holding ``lock``; a refusal (``InputError``) removes what taking the lock created."""
    try:
        return run()
    except InputError:
        lock.discard()  # still holding the lock, so no other run is using what it removes
        raise
    finally:
        lock.release()


def check_cache_dirs(cache_dir: str | None, fork_server: bool = True) -> None:
    """Refuse cache directories a command could not write: the store's and the fork server's.

    The store is ``cache_dir`` (``--cache-dir``) or else ``$INFERMATRIX_CACHE`` or the default;
    the fork server (``fork_server``: the command measures cells) writes its ``preload.log`` to
    the latter whatever ``--cache-dir`` says.
    """
    from optimize.models import default_cache_dir

    if cache_dir:
        output_dir(Path(cache_dir), "--cache-dir")
        if not fork_server:
            return
    env = os.environ.get("INFERMATRIX_CACHE")
    setting = "INFERMATRIX_CACHE" if env else "the default cache directory"
    try:
        output_dir(default_cache_dir(), setting)
    except InputError as exc:
        if cache_dir:
            raise InputError(f"{exc} (the fork server writes its preload.log there whatever --cache-dir says)") \
                from None
        if not env:
            raise InputError(f"{exc} (set INFERMATRIX_CACHE to use another)") from None
        raise


def _shard(args: argparse.Namespace):
    from bench.orchestrate import Shard

    return Shard.parse(args.shard) if args.shard is not None else None  # '' is refused, not ignored


def _matrix(args: argparse.Namespace):
    from bench.matrix import load_matrix, narrow

    repeat = {k: v for k, v in (("warmup", args.warmup), ("min_reps", args.min_reps), ("max_reps", args.max_reps),
                                ("budget_s", args.budget_s)) if v is not None}
    return narrow(load_matrix(args.matrix), models=args.model, variants=args.variants,
                  devices=[args.device] if args.device else None, batch_size=args.batch_size,
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeat=repeat,
                  timeout_s=args.timeout_s, threads=args.threads, trust_remote_code=args.trust_remote_code,
                  drift=False if args.no_drift else None, drift_protocol=args.drift_protocol, tokenizer=args.tokenizer,
                  prompt_source=args.prompt_source)


def _run(args: argparse.Namespace, run_dir: Path, shard, matrix) -> int:
    """Run (or, with ``matrix`` None, resume) the run in ``run_dir``, whose lock the caller holds."""
    from bench.env import device_resolver, environment
    from bench.matrix import expand
    from bench.orchestrate import (
        check_new_run_dir,
        execute,
        finish_run,
        make_launcher,
        plan_cells,
        resume_run,
        start_run,
    )
    from bench.progress import Progress
    from bench.results import read_run
    from bench.runner import probe_torch
    from bench.summary import print_summary
    from optimize.atomic import sweep_stale_tmp
    from optimize.models import default_cache_dir

    if matrix is None:
        matrix, run = resume_run(run_dir, shard)
        check_threads(matrix, args.launcher)
        if run.get("shard") and not shard:
            from bench.orchestrate import Shard

            shard = Shard.parse(run["shard"])
    else:
        check_new_run_dir(run_dir)
        check_threads(matrix, args.launcher)
        # the models first: an unreachable hub id or a model that cannot give the prompts asked for is
        # refused in a second, not after the fork server's imports (the probe below)
        hub_refs = _fetch_hub_models(matrix.models)
        _check_text_prompts(matrix, hub_refs)
        _check_eval_text_length(matrix, hub_refs, Path(args.cache_dir) if args.cache_dir else None)
        with tempfile.TemporaryDirectory(prefix="infermatrix-probe-") as tmp:
            torch_env = probe_torch(Path(tmp))
        resolve = device_resolver(torch_env)
        for device in matrix.devices:
            resolve(device)  # a CUDA matrix on a machine without CUDA fails before anything is written
        if not expand(matrix, resolve):
            raise InputError(f"{matrix.source}: the [[exclude]] rules remove every cell; nothing to run")
        start_run(matrix, run_dir, shard=shard, launcher=args.launcher,
                  environment={**environment(with_torch=False, user_path=Path(args.matrix) if args.matrix else None),
                               "torch": torch_env})
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    # builds and cache writes killed by an earlier timeout or crash left these (this host's only)
    folders = [cache / sub for sub in ("variants", "models", "flops", "tokens", "drift")]
    for stale in folders + sorted(cache.glob("drift/*/variants")):
        sweep_stale_tmp(stale)
    sweep_stale_tmp(run_dir)  # a run.json write cut short by a kill; the lock keeps other writers out
    recorded_torch = (read_run(run_dir).get("environment") or {}).get("torch")
    resolve = device_resolver(recorded_torch or probe_torch(run_dir / "logs"))
    if args.resume:  # refuse records of another matrix or shard before anything runs; the hub cache may
        # have been cleared since: fetch the models the cells left to run need
        plan = plan_cells(matrix, run_dir, shard, resolve)
        cells, _, todo = plan
        if not todo and run.get("ended"):  # finished: its records, end time and reports stay as they are
            return _finished(args, run_dir, run, {c.cell_id for c in cells})
        _fetch_hub_models(sorted({c.model for c in todo}))
        _check_resume_environment(run_dir, run, len(todo), args.allow_env_mismatch,
                                  lambda: probe_torch(run_dir / "logs"))
    else:
        plan = None
    print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    launcher = make_launcher(args.launcher, run_dir, args.ray_address, args.logs_dir)
    try:
        with Progress(quiet=args.quiet) as progress:
            records = execute(matrix, run_dir, launcher, shard=shard, on_event=progress.event,
                              cache_dir=args.cache_dir, resolve_device=resolve, plan=plan)
    finally:
        launcher.close()
    finish_run(run_dir)
    print_summary(records, run_dir)
    if not args.no_report:
        _write_reports(run_dir)
    return _exit_code(records)


def _exit_code(records: list[dict]) -> int:
    """1 when a check failed: a cell failed (a round of one short of its rounds too), or a variant drifted past
    the matrix's budget; else 0. ``records`` are one per cell (``bench.rounds.cell_records``).
    """
    from bench.rounds import failed_rounds

    return 1 if any(r["status"] == "failed" or failed_rounds(r) or r.get("drift_ok") is False
                    for r in records) else 0


def _finished(args: argparse.Namespace, run_dir: Path, run: dict, cell_ids: set[str]) -> int:
    """``--resume`` of a run whose every cell has its ok record: nothing runs, ``ended`` is kept, and only
    missing reports are written; the others stay byte for byte, hand edits too (``infermatrix report``
    renders them again).
    """
    from bench.report.write import FORMATS, RUN_END_FORMATS
    from bench.rounds import read_cell_records
    from bench.summary import print_summary

    records = [r for r in read_cell_records(run_dir, run) if r["cell_id"] in cell_ids]
    print(f"infermatrix run: every cell of {run_dir} already has its record (ended {run['ended']}); nothing to run "
          f"('infermatrix report {run_dir}' renders its reports again)", file=sys.stderr)
    print_summary(records, run_dir)
    missing = [f for f in RUN_END_FORMATS if not (run_dir / FORMATS[f]).exists()]
    if not args.no_report and missing:
        _write_reports(run_dir, missing)
    return _exit_code(records)


def _fetch_hub_models(models) -> dict:
    """The hub models among ``models``, fetched (``InputError`` for one that cannot be had): spec -> ``ModelRef``."""
    from optimize.models import fetch_hub_model, is_hub_spec

    refs = {}
    for spec in models:
        if is_hub_spec(spec):
            print(f"fetching hub model {spec}", file=sys.stderr, flush=True)
            refs[spec] = fetch_hub_model(spec)
    return refs


def _check_resume_environment(run_dir: Path, run: dict, todo: int, allow: bool, probe) -> None:
    """Refuse to measure a run's remaining cells where the gate would not compare them with its recorded
    ones (another CPU, GPU, driver, thread count or library version): one run would mix two environments
    under one run.json. With ``allow``, the differences are added to run.json's ``environment_differences``,
    and the roofline ceilings are measured again here (the earlier ones move to ``earlier_rooflines``), so
    the new cells' fractions are of this machine's ceilings, as their records' ``roofline_ceilings`` say.
    """
    from bench.compare import environment_changes
    from bench.env import environment
    from bench.results import RUN, utc_now, write_json_atomic

    recorded = run.get("environment")
    if not isinstance(recorded, dict) or "cpu_model" not in recorded:
        return  # a run that recorded no machine (only torch's view, or nothing) has nothing to hold this one to
    here = {**environment(with_torch=False), "torch": probe()}
    changes = environment_changes(recorded, here)
    if not changes:
        return
    said = [f"{k} is {b!r} here, {a!r} where the run started" for k, a, b in changes]
    if not allow:
        more = f" (and {len(said) - 1} more)" if len(said) > 1 else ""
        cells = f"{todo} remaining cell{'' if todo == 1 else 's'}"
        raise InputError(f"--resume {run_dir}: this machine differs from where the run started: {said[0]}{more}; "
                         f"its {cells} would be measured in another environment than the one run.json records "
                         "(start a new run, or resume with --allow-env-mismatch: run.json then records the "
                         "difference)")
    at = utc_now()
    host = here.get("hostname") or "?"
    updated = {**run, "environment_differences": [*run.get("environment_differences", []),
                                                  *(f"resumed {at} on {host}: {s}" for s in said)]}
    if updated.get("roofline"):
        updated["earlier_rooflines"] = [*run.get("earlier_rooflines", []),
                                        {"until": at, "roofline": updated.pop("roofline")}]
        updated["roofline_differences"] = [*run.get("roofline_differences", []),
                                           f"resumed {at} on {host}: the ceilings were measured again there"]
    write_json_atomic(run_dir / RUN, updated)
    print(f"infermatrix run: warning: resuming in a differing environment ({'; '.join(said)}); recorded in "
          "run.json's environment_differences: compare withholds its verdicts on this run", file=sys.stderr)


def check_threads(matrix, launcher: str) -> None:
    """Refuse more threads per cell than this machine lets the run use (local cells only: a Ray node may
    have more cores than the host that parses the matrix); each cell would time its own contention.
    """
    if launcher == "local":
        check_thread_count(matrix.measure.threads, "--threads or [measure] threads")


def _check_text_prompts(matrix, hub_refs: dict) -> None:
    """``prompt_source = "eval-text"`` needs a tokenizer for every model: refuse one without (``InputError``),
    rather than fail each of its cells with the same cause. Built-in and synthetic models always have one.
    """
    from optimize.models import no_tokenizer_reason, peek_model

    if matrix.prompt_source != "eval-text" or matrix.tokenizer:
        return
    for spec in matrix.models:
        ref = hub_refs.get(spec) or peek_model(spec)
        if ref is not None and ref.tokenizer is None:
            raise InputError(f"prompt_source 'eval-text': {no_tokenizer_reason(ref)}")


def _check_eval_text_length(matrix, hub_refs: dict, cache_dir: Path | None) -> None:
    """A user's evaluation text too short for what the matrix reads from it is refused (``InputError``) before
    anything is written, rather than fail every cell (or every drift score) of a model with the same cause:
    the longest prompt, where prompts come from the text (``prompt_source = "eval-text"``, or ``auto`` with
    the model's own or the built-in tokenizer), and drift's windows and generation prompts. A synthetic model
    not yet built has the built-in tokenizer.
    """
    from optimize.models import encoded_eval_text, peek_model

    if matrix.eval_text is None:
        return
    longest = max(p for grid in matrix.scenarios for p in grid["prompt_tokens"])
    drift = matrix.drift
    for spec in matrix.models:
        ref = hub_refs.get(spec) or peek_model(spec, cache_dir, matrix.tokenizer) or (
            peek_model("builtin:pycode", cache_dir) if spec.startswith("synthetic:") else None)
        if ref is None or ref.tokenizer is None:
            continue  # no text for it (random ids, no drift), or its cells say why
        needs = []  # (tokens, what needs them, what to change)
        if matrix.prompt_source == "eval-text" or (matrix.prompt_source == "auto" and (
                ref.has_tokenizer or ref.kind in ("builtin", "synthetic"))):
            needs.append((longest + 1, f"a prompt of {longest} tokens (the matrix's longest prompt_tokens)",
                          ", shorter prompts or prompt_source = \"random\""))
        if drift.enabled:
            shorter = " or a shorter [drift] setting (--no-drift measures speed alone)"
            needs += [(drift.context, f"a drift window of {drift.context} tokens ([drift] context)", shorter),
                      (drift.gen_prompt_tokens, f"a drift generation prompt of {drift.gen_prompt_tokens} tokens",
                       shorter)]
        if not needs:
            continue
        need, what, advice = max(needs)
        tokens = len(encoded_eval_text(ref, matrix.eval_text, matrix.trust_remote_code, cache_dir))
        if tokens < need:
            raise InputError(f"eval_text {matrix.eval_text!r} is {tokens} tokens long with {spec}'s tokenizer; "
                             f"{what} needs at least {need}: give a longer text{advice}")


def _write_reports(run_dir: Path, formats: list[str] | None = None) -> None:
    """The reports in ``formats`` (default: every end-of-run format) at the end of a run; a report that fails
    to render never costs the recorded results.
    """
    from bench.report.write import RUN_END_FORMATS, write_reports

    formats = list(RUN_END_FORMATS) if formats is None else formats
    try:
        paths = write_reports(run_dir, formats)
    except Exception as exc:  # the records are safe on disk; say so and carry on
        print(f"infermatrix run: reports not written ({type(exc).__name__}: {exc}); "
              f"retry with 'infermatrix report {run_dir} --format {','.join(formats)}'", file=sys.stderr)
        return
    print("reports: " + ", ".join(str(p) for p in paths), file=sys.stderr)
