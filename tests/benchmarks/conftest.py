"""Self-benchmarks of the harness (pytest-benchmark): run with ``pytest tests/benchmarks --benchmark-only``.

They are skipped in the ordinary test run so that ``make test`` stays fast.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench.gate_helpers import synthetic_run

CELLS = 10_000


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="self-benchmark: run with pytest --benchmark-only")
    for item in items:
        if "benchmarks" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def big_runs(tmp_path_factory):
    """Two synthetic 10,000-cell runs (5 repetitions per cell, 3% noise); head slows 1% of cells by 20%."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    base = synthetic_run(root / "base", rng, CELLS, cv=0.03)
    head = synthetic_run(root / "head", rng, CELLS, cv=0.03, slowdown={f"v{i}": 1.2 for i in range(0, CELLS, 100)})
    return base, head
