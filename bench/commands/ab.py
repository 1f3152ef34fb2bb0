"""``infermatrix ab BASE_REV [HEAD_REV] [MATRIX]``: the regression gate for CI.

Runs two revisions of the git repository here interleaved in one job (see ``bench.ab``)
and compares them like ``infermatrix compare``. Exit codes: 1 only on a regression,
2 on bad input, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.commands import folder, nonempty
from bench.commands.compare import add_gate_arguments, check_outputs, emit, gate_config
from optimize.errors import clip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE_REV", type=nonempty("BASE_REV"),
                   help="base revision (e.g. the merge base: origin/main, HEAD~1)")
    p.add_argument("head", metavar="HEAD_REV", nargs="?", default="HEAD", type=nonempty("HEAD_REV"),
                   help="head revision (default HEAD)")
    p.add_argument("matrix", metavar="MATRIX", nargs="?", type=nonempty("MATRIX"),
                   help="matrix file, a path inside the repository read at each revision "
                        "(default: the built-in default matrix)")
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh processes per cell and side, interleaved A B / B A (default 2; more narrows the MDE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round cell order")
    p.add_argument("--out", type=folder("--out"),
                   help="directory for the two runs (default reports/ab/TIMESTAMP)")
    p.add_argument("--cache-dir", type=folder("--cache-dir", str),
                   help="variant store (default: $INFERMATRIX_CACHE or ~/.cache/infermatrix)")
    p.add_argument("--repo", type=nonempty("--repo", Path), default=Path("."),
                   help="the git repository (default: the one here)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads per cell on both sides, over the matrix's [measure] threads (0: torch's "
                        "default); 1 halves the noise on a shared 2-core machine (README, regression gate)")
    p.add_argument("--quiet", action="store_true", help="no per-cell lines")
    add_gate_arguments(p)


def _printer(quiet: bool):
    def on_event(kind: str, info: dict) -> None:
        if kind == "build":
            print(f"build {info['side']} {info['variant']}: {info['status']}", file=sys.stderr, flush=True)
        elif kind == "plan":
            print(f"ab: {info['cells']} cells x 2 sides x {info['rounds']} rounds = {info['jobs']} cell processes",
                  file=sys.stderr, flush=True)
        elif kind == "cell" and not quiet:
            rate = info.get("metrics", {}).get("decode_tokens_per_s")
            what = f"decode {rate:.1f} tok/s" if isinstance(rate, (int, float)) else clip(info.get("error") or "", 120)
            print(f"{info['side']:4} {info['variant']}: {info['status']} {what}", file=sys.stderr, flush=True)
    return on_event


def _in_repo(matrix: str, repo: Path) -> str:
    """MATRIX as a path inside the repository, read at each revision; ``InputError`` if it leaves it.

    An absolute path, or a relative one that exists from here, is taken from here; any other
    relative path is taken from the repository's root.
    """
    from optimize.errors import InputError

    here = Path(matrix)
    if here.is_absolute() or here.exists():
        try:
            return str(here.resolve().relative_to(repo))
        except ValueError:
            raise InputError(f"MATRIX {matrix} is outside the repository {repo}") from None
    inside = os.path.normpath(matrix)
    if inside == ".." or inside.startswith(".." + os.sep):
        raise InputError(f"MATRIX {matrix} is outside the repository {repo}")
    return inside


def main(args: argparse.Namespace) -> int:
    from bench.ab import repo_root
    from bench.commands.run import check_cache_dirs, locked
    from bench.runlock import LOCK, RunLock
    from optimize.errors import InputError

    if args.rounds < 1:
        raise InputError(f"--rounds must be >= 1, got {args.rounds}")
    cfg = gate_config(args)
    cfg.validate()
    check_outputs(args)  # a typo in --json must not cost the whole A/B job at its end
    check_cache_dirs(args.cache_dir)
    repo = repo_root(args.repo.resolve())
    head_rev, matrix = args.head, args.matrix
    if matrix is None and head_rev.endswith(".toml"):
        head_rev, matrix = "HEAD", head_rev  # `ab BASE MATRIX.toml`
    if matrix:
        matrix = _in_repo(matrix, repo)
    out = args.out or Path("reports") / "ab" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    if out.exists() and any(path.name != LOCK for path in out.iterdir()):  # a lock alone: its holder is named
        raise InputError(f"--out {out} already exists and is not empty")
    # Seen: two jobs on one --out (the default's name is the second it starts in) each pooled the other's records
    return locked(RunLock(out).acquire(), lambda: _ab(args, cfg, repo, head_rev, matrix, out))


def _ab(args: argparse.Namespace, cfg, repo: Path, head_rev: str, matrix: str | None, out: Path) -> int:
    """The A/B job itself, holding ``out``'s lock."""
    from bench.runlock import LOCK
    from optimize.errors import InputError

    if any(path.name != LOCK for path in out.iterdir()):  # a job that took the lock and ended in between
        raise InputError(f"--out {out} already exists and is not empty")
    from bench.ab import (
        OWNER,
        TEMP_PREFIX,
        AbSide,
        git,
        remove_worktrees,
        resolve_rev,
        run_interleaved,
        side_matrix,
        sweep_stale_worktrees,
    )
    from bench.commands.run import check_threads
    from bench.compare import compare_runs
    from bench.env import device_resolver, environment
    from bench.matrix import narrow
    from bench.orchestrate import make_launcher
    from bench.runner import probe_torch

    shas = {"base": resolve_rev(repo, args.base), "head": resolve_rev(repo, head_rev)}
    revs = {"base": args.base, "head": head_rev}
    if swept := sweep_stale_worktrees(repo):
        print(f"ab: removed {len(swept)} worktree(s) an ab job killed before it could clean up left in {repo}: "
              f"{', '.join(map(str, swept))}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        (Path(tmp) / OWNER).write_text(str(os.getpid()))  # a later job sweeps the worktrees of a killed one
        trees: list[Path] = []
        try:
            sides = {}
            for name, sha in shas.items():
                tree = Path(tmp) / name
                trees.append(tree)  # before adding it: a failed add may leave a registration to remove
                git(repo, "worktree", "add", "--detach", "--force", str(tree), sha)
                at = f"{revs[name]} ({sha[:10]})"
                m = side_matrix(tree, matrix, at)
                if args.threads is not None:
                    m = narrow(m, threads=args.threads)
                    check_threads(m, "local")
                sides[name] = AbSide(name, revs[name], sha, tree, out / name, m, repo=repo)
            print(f"ab: base {revs['base']} ({shas['base'][:10]}) vs head {head_rev} ({shas['head'][:10]}), "
                  f"matrix {matrix or 'built-in default'}; runs in {out}", file=sys.stderr, flush=True)
            torch_env = probe_torch(Path(tmp))
            resolve = device_resolver(torch_env)
            launcher = make_launcher("local", out)
            try:
                run_interleaved(sides["base"], sides["head"], launcher, rounds=args.rounds, seed=args.seed,
                                environment={**environment(with_torch=False), "torch": torch_env},
                                cache_dir=args.cache_dir, resolve_device=resolve,
                                allow_unmatched=args.allow_unmatched, on_event=_printer(args.quiet))
            finally:
                launcher.close()
        finally:
            remove_worktrees(repo, trees)
    comparison = compare_runs(out / "base", out / "head", cfg, allow_env_mismatch=args.allow_env_mismatch,
                              allow_unmatched=args.allow_unmatched)
    return emit(comparison, args)
