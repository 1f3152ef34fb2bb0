"""Interleaved A/B runs of two revisions of the user's repository in one job.

Each revision is checked out in a git worktree of its own; its matrix file, inline recipes
and model directories are read from there. Variants are built once per side (the variant
store is content-addressed, so an unchanged recipe reuses the other side's build and a
later run reuses both). Then every cell runs ``rounds`` times per side in fresh processes,
in the order A B, B A, ... (which side goes first alternates by cell and by round, and the
cell order is shuffled per round), so a burst of load lands on both sides alike. Speed
only: drift and roofline ceilings do not vary between processes and are not measured.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cells import Cell
from bench.matrix import DEFAULT_MATRIX, Matrix, expand, load_matrix
from bench.orchestrate import build_id, build_job, finish_run, start_run
from bench.results import append_record, failed_record
from optimize.errors import InputError


def git(repo: Path, *args: str) -> str:
    """The output of git; its whole process group is killed if this is interrupted (Ctrl-C, SIGTERM, the timeout).

    Seen: interrupted during ``worktree add``, only git itself was killed; the ``git reset`` it had
    started went on filling the worktree after ab had ended, so its folder could not be removed.
    """
    proc = subprocess.Popen(["git", "-C", str(repo), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except BaseException:
        from bench.runner import kill_group

        kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise InputError(f"git {' '.join(args)}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return stdout.strip()


def repo_root(path: Path) -> Path:
    try:
        return Path(git(path, "rev-parse", "--show-toplevel"))
    except InputError:
        raise InputError(f"{path} is not inside a git repository: ab compares two revisions of one") from None


def resolve_rev(repo: Path, rev: str) -> str:
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except InputError:
        hint = ""
        if git(repo, "rev-parse", "--is-shallow-repository") == "true":
            hint = (" (a shallow clone: fetch the history it needs, e.g. `git fetch --deepen=1`, or check out with "
                    "fetch-depth: 2 or 0)")
        raise InputError(f"revision {rev!r} is not a commit of {repo}{hint}") from None


TEMP_PREFIX = "infermatrix-ab-"  # ab's temporary folder, holding its worktrees base/ and head/
OWNER = "owner.pid"  # in that folder: the PID of the ab job that made it


def sweep_stale_worktrees(repo: Path) -> list[Path]:
    """Remove the worktrees of ``repo`` that an ab job killed outright (SIGKILL, a lost machine) left behind.

    They are those in a folder ``infermatrix-ab-*`` whose owner PID is not alive (another ab job's
    are kept); the folder goes too. Returns the worktrees removed.
    """
    import shutil

    stale = []
    for line in git(repo, "worktree", "list", "--porcelain").splitlines():
        if not line.startswith("worktree "):
            continue
        tree = Path(line.removeprefix("worktree "))
        if tree.name not in ("base", "head") or not tree.parent.name.startswith(TEMP_PREFIX):
            continue
        if not _owner_alive(tree.parent / OWNER):
            stale.append(tree)
    remove_worktrees(repo, stale)
    for folder in {tree.parent for tree in stale}:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _owner_alive(pid_file: Path) -> bool:
    import os

    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False  # no owner written (killed at once) or its folder gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_worktrees(repo: Path, trees: list[Path]) -> None:
    """Remove ab's temporary worktrees and their registrations in ``repo``, whatever ended the job.

    Runs on every exit path, an error included, so it raises nothing of its own (a tree
    never added is simply not found). ``remove --force`` also drops a registration whose
    directory is gone; ``worktree prune`` is not used, as it would also drop the user's own
    registrations of worktrees that are only unreachable for now (an unmounted disk).
    """
    # A second Ctrl-C or SIGTERM waits until every tree is removed (seen: one interrupted this loop and left a
    # registration); ``--force`` twice also removes a tree still locked by an interrupted ``worktree add``.
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for tree in trees:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", "--force", str(tree)],
                           capture_output=True, timeout=120)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@dataclass
class AbSide:
    name: str  # "base" or "head"
    rev: str
    sha: str
    worktree: Path
    run_dir: Path
    matrix: Matrix | None = None
    repo: Path | None = None  # the repository the worktree was checked out of
    cells: dict[str, Cell] = dataclasses.field(default_factory=dict)  # by Cell.key


def side_matrix(worktree: Path, matrix: str | None, rev: str = "that revision") -> Matrix:
    """The side's matrix (from its worktree), speed-only, local model paths made absolute."""
    if matrix and not (worktree / matrix).exists():
        raise InputError(f"matrix {matrix!r} does not exist at {rev} (each side reads the matrix committed "
                         "at its revision: commit it, or name one both revisions have)")
    try:
        m = load_matrix(worktree / matrix if matrix else DEFAULT_MATRIX)
    except InputError as exc:  # it names the temporary worktree, gone when the user reads this: name the revision
        raise InputError(str(exc).replace(f"{worktree}/", f"{rev}:")) from None
    models = tuple(str((worktree / s).resolve()) if not s.startswith(("builtin:", "synthetic:")) and
                   (worktree / s).exists() else s for s in m.models)
    eval_text = str((worktree / m.eval_text).resolve()) if m.eval_text and (worktree / m.eval_text).exists() \
        else m.eval_text
    return dataclasses.replace(m, models=models, eval_text=eval_text,
                               drift=dataclasses.replace(m.drift, enabled=False),
                               measure=dataclasses.replace(m.measure, roofline=False))


def schedule(keys: list[str], rounds: int, seed: int = 0) -> list[tuple[str, str]]:
    """(cell key, side) in run order: per round a shuffled cell order, each cell's pair A B or B A.

    Which side goes first alternates from round to round for each cell (and between
    neighbouring cells), so over an even number of rounds each side goes first equally often
    and a steady drift of load cancels out.
    """
    rng = random.Random(seed)
    index = {key: i for i, key in enumerate(keys)}
    order: list[tuple[str, str]] = []
    for r in range(rounds):
        cells = list(keys)
        rng.shuffle(cells)
        for key in cells:
            first, second = ("base", "head") if (index[key] + r) % 2 == 0 else ("head", "base")
            order += [(key, first), (key, second)]
    return order


def prepare(side: AbSide, launcher, cache_dir: str | None,
            on_event: Callable[[str, dict[str, Any]], None]) -> dict[str, dict[str, Any]]:
    """Build the variants of the side's cells; returns cells that cannot run, with their outcome."""
    from bench.orchestrate import _already_stored

    builds: dict[str, dict[str, Any]] = {}
    for c in side.cells.values():
        bid = build_id(c)
        if bid and bid not in builds:
            builds[bid] = build_job(bid, c)
    outcomes = _already_stored(builds, {}, cache_dir)
    pending = [("build", b, side.matrix.measure.timeout_s) for bid, b in builds.items() if bid not in outcomes]
    for spec, result in launcher.run(pending):
        outcomes[spec["build_id"]] = result
        on_event("build", {"side": side.name, "variant": spec["variant"]["name"], "status": result["status"],
                           "build_s": result.get("build_s")})
    blocked = {}
    for key, c in side.cells.items():
        outcome = outcomes.get(build_id(c) or "")
        if outcome and outcome["status"] != "ok":
            blocked[key] = outcome
    return blocked


def run_interleaved(base: AbSide, head: AbSide, launcher, *, rounds: int, seed: int, environment: dict[str, Any],
                    cache_dir: str | None, resolve_device, allow_unmatched: bool = False,
                    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, info: None) -> list[str]:
    """Build both sides, then run their matched cells interleaved; returns the unmatched cells.

    Cells in only one side's matrix are refused (``InputError``, unless ``allow_unmatched``) before
    anything is built or written.
    """
    sides = {"base": base, "head": head}
    for s in sides.values():
        s.cells = {c.key: dataclasses.replace(c, cache_dir=cache_dir) for c in expand(s.matrix, resolve_device)}
    unmatched = [f"{k} (only in base)" for k in sorted(set(base.cells) - set(head.cells))] + \
                [f"{k} (only in head)" for k in sorted(set(head.cells) - set(base.cells))]
    if unmatched and not allow_unmatched:
        raise InputError(f"{len(unmatched)} cells are in only one revision's matrix (use --allow-unmatched to skip "
                         f"them): {'; '.join(unmatched[:8])}")
    for s in sides.values():
        s.run_dir.mkdir(parents=True, exist_ok=True)
        # what this side measured: a clean checkout of its commit, not the checkout ab was started from
        side_env = {**environment, "user_repository": {"path": str(s.repo) if s.repo else None, "commit": s.sha,
                                                       "dirty": False}}
        start_run(s.matrix, s.run_dir, shard=None, launcher=launcher.name, environment=side_env,
                  extra={"ab": {"side": s.name, "rev": s.rev, "commit": s.sha, "rounds": rounds, "seed": seed}})
    blocked = {name: prepare(s, launcher, cache_dir, on_event) for name, s in sides.items()}
    keys = sorted(set(base.cells) & set(head.cells))
    for name, s in sides.items():
        for key, outcome in blocked[name].items():
            if key in keys:
                record = failed_record(s.cells[key], f"build: {outcome['error']}")
                record["status"] = outcome["status"]
                append_record(s.run_dir, record)
    jobs = [(key, name) for key, name in schedule(keys, rounds, seed) if key not in blocked[name]]
    on_event("plan", {"cells": len(keys), "jobs": len(jobs), "rounds": rounds})
    timeout = max(base.matrix.measure.timeout_s, head.matrix.measure.timeout_s)
    for position, (key, name) in enumerate(jobs):
        s = sides[name]
        cell = s.cells[key]
        (spec, result), = launcher.run([("cell", cell.to_dict(), timeout)])
        from bench.runner import cell_result_to_record

        record = cell_result_to_record(cell, result)
        record["ab"] = {"side": name, "position": position}
        append_record(s.run_dir, record)
        on_event("cell", {**record, "side": name})
    for s in sides.values():  # each side is a whole run: reports, select and history add take it as ended
        finish_run(s.run_dir)
    return unmatched
