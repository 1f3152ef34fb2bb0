"""Run jobs one after another on this machine, each in its own process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.runner import run_job


class LocalLauncher:
    name = "local"

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir

    def run(self, jobs: list[tuple[str, dict[str, Any], float]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Yield ``(spec, result)`` for each ``(kind, spec, timeout_s)`` as it finishes."""
        for kind, spec, timeout_s in jobs:
            yield spec, run_job(kind, spec, self.work_dir, timeout_s)

    def close(self) -> None:
        pass
