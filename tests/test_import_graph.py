"""The package's import graph, read from source by an AST walk (tests/import_graph.py).

Module-level imports and function-level imports (inside a ``def``) are collected separately;
both are checked for cycles: a function-level import only defers a cycle, it still ties two
modules to each other.
"""

from __future__ import annotations

import pytest

from tests.import_graph import ROOT, cycles, import_graph


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walk_sees_module_and_function_level_imports(graph):
    top, inner = graph
    assert "bench.metrics.timing" in top["bench.matrix"]  # `from bench.metrics.timing import RepeatConfig`
    assert "bench.cell" in inner["bench.runner"]  # `from bench.cell import main` inside a function
    assert "optimize.recipe" in top["optimize.registry"]
    assert len(top) > 50


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycles_among_module_level_imports(graph):
    top, _ = graph
    assert cycles(top) == []


def test_no_cycles_even_through_function_level_imports(graph):
    top, inner = graph
    assert cycles({m: top[m] | inner[m] for m in top}) == []


def test_optimize_never_imports_bench(graph):
    top, inner = graph
    offenders = {m: sorted(d for d in top[m] | inner[m] if d.startswith("bench"))
                 for m in top if m.startswith("optimize")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_metrics_never_import_scenarios_and_matrix_imports_no_measurement(graph):
    top, inner = graph
    for m in top:
        if m.startswith("bench.metrics"):
            assert not any(d.startswith("bench.scenarios") for d in top[m] | inner[m]), m
    assert "bench.metrics.drift" not in top["bench.matrix"] | inner["bench.matrix"]
    assert "bench.metrics.drift_config" in top["bench.matrix"]


def test_only_the_timing_module_reads_gpu_events():
    users = sorted(str(p.relative_to(ROOT)) for pkg in ("bench", "optimize") for p in (ROOT / pkg).rglob("*.py")
                   if "cuda.Event" in p.read_text())
    assert users == ["bench/metrics/timing.py"]
