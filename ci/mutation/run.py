"""Mutation testing of the core with mutmut, one group of modules at a time.

Each group (ci/mutation/groups.toml) runs in a scratch copy of the tree under
``.mutation/<group>`` whose pyproject.toml carries that group's mutmut settings, so a
module is judged by its own tests only. Prints the score per group and every surviving
mutant; survivors listed in ci/mutation/MUTANTS.md (equivalent mutants, with the reason)
are marked as explained. Exits 1 when an unexplained mutant survives, or when no test of the
group runs one of its functions (mutmut's "no tests": such a function's mutants all live).

Usage: python ci/mutation/run.py [GROUP ...] [--jobs N] [--keep] [--reuse]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCRATCH = ROOT / ".mutation"
COPIED = ("bench", "optimize", "tests", "reports", "pyproject.toml")  # reports: the committed example run


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def prepare(name: str, group: dict) -> Path:
    """A scratch tree for one group, with that group's [tool.mutmut] appended to pyproject.toml."""
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for item in COPIED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=ignore)
        else:
            shutil.copy(src, work / item)
    tests = group["tests"]  # pytest arguments: files, node ids, -k expressions
    missing = [t for t in tests if not t.startswith("-") and "/" in t and not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"group {name}: tests not found: {missing}")
    settings = (
        "\n[tool.mutmut]\n"
        'source_paths = ["bench", "optimize"]\n'
        f"only_mutate = {_toml_list(group['files'])}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly"]\n'
        "use_git_change_detection = false\n"
        # The committed example run: report-render's tests compare its reports with what the code renders.
        'also_copy = ["reports"]\n'
        # Workers fork from a process that never ran torch: forking one whose OpenMP pool is
        # live leaves children hanging until the timeout, which counts as a kill and costs minutes.
        'process_isolation = "forkserver"\n'
    )
    pyproject = work / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + settings)
    return work


def explained() -> dict[str, str]:
    """Mutant name -> reason, from the bullet list in MUTANTS.md (``- `name`: reason``)."""
    path = HERE / "MUTANTS.md"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.match(r"\s*-\s*`([^`]+)`\s*:?\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def wanted(key: str, group: dict) -> bool:
    """True for the mutants of this group's files (and functions, when the group names some)."""
    modules = [_module(f) for f in group["files"]]
    if not any(key.startswith(m + ".") for m in modules):
        return False
    def named(names: list[str]) -> bool:
        return any(f"x_{f}__" in key or f"\u01c1{f}\u01c1" in key for f in names)

    # Functions left out (reason in groups.toml): their tests are not in the group, so their
    # mutants would only show as "no tests".
    if named(group.get("skip", [])):
        return False
    return not group.get("functions") or named(group["functions"])


def selected(group: dict) -> list[str]:
    """Mutant name patterns for mutmut when the group names its functions: only those are run."""
    names = group.get("functions") or []
    return [f"{_module(f)}.{pattern}" for f in group["files"] for n in names
            for pattern in (f"x_{n}__mutmut_*", f"x\u01c1{n}\u01c1*")]


def run_group(name: str, group: dict, jobs: int, reuse: bool = False) -> dict:
    work = SCRATCH / name
    if not (reuse and (work / "mutants").is_dir()):
        work = prepare(name, group)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *selected(group)],
                         cwd=work, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
        raise SystemExit(f"group {name}: mutmut run failed with exit code {run.returncode}")
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True, check=True).stdout
    status: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.strip().rpartition(": ")
        if sep and wanted(key, group):
            status[key] = value
    return {"status": status, "elapsed_s": elapsed, "work": work}


def diff(work: Path, key: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", key], cwd=work, capture_output=True, text=True)
    return "\n".join(line for line in out.stdout.splitlines()[1:] if line.startswith(("+", "-"))
                     and not line.startswith(("+++", "---")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*",
                        help="groups to run (default: every group in groups.toml not marked optional)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch trees under .mutation/")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a kept scratch tree's results (only unchecked mutants run); implies --keep")
    args = parser.parse_args(argv)
    groups = tomllib.loads((HERE / "groups.toml").read_text())
    unknown = [g for g in args.groups if g not in groups]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {sorted(groups)}")
    reasons = explained()
    unexplained = 0
    rows = []
    for name in args.groups or [g for g in groups if not groups[g].get("optional")]:
        result = run_group(name, groups[name], args.jobs, args.reuse)
        counts: dict[str, int] = {}
        for value in result["status"].values():
            counts[value] = counts.get(value, 0) + 1
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        survived = sorted(k for k, v in result["status"].items() if v == "survived")
        judged = killed + len(survived)
        score = killed / judged if judged else float("nan")
        rows.append((name, len(result["status"]), killed, len(survived), counts.get("no tests", 0), score,
                     result["elapsed_s"]))
        print(f"== {name}: {killed}/{judged} killed ({score:.1%}), {len(survived)} survived, "
              f"{counts.get('no tests', 0)} without tests, other {dict(counts)}, {result['elapsed_s']:.0f} s")
        for key in survived:
            note = reasons.get(key)
            unexplained += note is None
            print(f"  {'explained' if note else 'SURVIVED '} {key}" + (f": {note}" if note else ""))
            if note is None:
                print("    " + diff(result["work"], key).replace("\n", "\n    "))
        untested: dict[str, int] = {}  # a function no test of the group reaches: every mutant of it "lives"
        for key, value in result["status"].items():
            if value == "no tests" and key not in reasons:
                function = re.sub(r"__mutmut_\d+$", "", key)
                untested[function] = untested.get(function, 0) + 1
        for function, n in sorted(untested.items()):
            unexplained += 1
            print(f"  NO TESTS  {function}: {n} mutant(s), and no test of the group runs it")
        if not (args.keep or args.reuse):
            shutil.rmtree(result["work"], ignore_errors=True)
    print("\ngroup      mutants  killed  survived  no-tests  score   time_s")
    for name, total, killed, survived, no_tests, score, elapsed in rows:
        print(f"{name:<10} {total:>7} {killed:>7} {survived:>9} {no_tests:>9}  {score:6.1%} {elapsed:>7.0f}")
    print(f"\n{unexplained} unexplained surviving mutant(s) or untested function(s)")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
