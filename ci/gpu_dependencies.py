"""One line for ci/gpu-check: which of the project's dependencies this interpreter lacks, or has at another version.

A host that has PyTorch but not the project's stack runs the checkout from ``PYTHONPATH``, so
nothing installed the dependencies and pip never compared their versions. Read them from
``pyproject.toml`` (the required ones, and pytest from the ``test`` extra: the CUDA tests need
it, not the linters) and compare them with what ``importlib.metadata`` finds on ``sys.path``. Exit status 0 either way:
a missing optional library (bitsandbytes, say) only skips its cells, which say so.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's floor is 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(pyproject: Path = PYPROJECT, from_test_extra: tuple[str, ...] = ("pytest",)) -> list[Requirement]:
    """The project's required dependencies and the named ones of its ``test`` extra, whose markers hold here."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = [Requirement(spec) for spec in project["dependencies"]]
    found += [r for r in map(Requirement, project["optional-dependencies"]["test"]) if r.name in from_test_extra]
    return [r for r in found if r.marker is None or r.marker.evaluate()]


def unmet(reqs: list[Requirement]) -> list[str]:
    """``name (not installed)`` or ``name VERSION (needs SPEC)`` for each requirement not met; each name once."""
    out, seen = [], set()
    for req in reqs:
        if req.name in seen:
            continue
        seen.add(req.name)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            out.append(f"{req.name} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} (needs {req.specifier})")
    return out


def main() -> int:
    reqs = requirements()
    missing = unmet(reqs)
    if missing:
        print(f"gpu-check: {len(missing)} of {len(reqs)} dependencies not met: {'; '.join(missing)}")
    else:
        print(f"gpu-check: all {len(reqs)} dependencies met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
