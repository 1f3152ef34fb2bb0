"""Each measurement of a cell is one call with one job: memory, roofline (latency and drift run in the runner tests)."""

from __future__ import annotations

from types import SimpleNamespace

from bench import cell
from bench.cells import Cell
from bench.scenarios import GenerateScenario
from optimize.recipe import Recipe


def _cell(ceilings) -> Cell:
    return Cell(model="m", recipe=Recipe(name="fp32"), device="cpu", scenario=GenerateScenario(), ceilings=ceilings)


def test_memory_on_cpu_is_the_peak_rss_and_its_increase(monkeypatch):
    from bench.metrics import memory

    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5000)
    assert cell._measure_memory("cpu", 1200) == {"peak_memory_bytes": 5000, "rss_increase_bytes": 3800}


def test_memory_on_cuda_is_the_allocator_peak_plus_host_rss(monkeypatch):
    from bench.metrics import memory

    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5000)
    peaks = {"cuda_max_allocated_bytes": 700, "cuda_max_reserved_bytes": 900}
    monkeypatch.setattr(memory, "cuda_memory", lambda: peaks)
    assert cell._measure_memory("cuda", 1200) == {"cuda_max_allocated_bytes": 700, "cuda_max_reserved_bytes": 900,
                                                  "peak_memory_bytes": 700, "host_peak_rss_bytes": 5000}


def test_roofline_is_skipped_without_ceilings_or_decode_figures(monkeypatch):
    monkeypatch.setattr(cell, "_roofline", lambda *a: (_ for _ in ()).throw(AssertionError("must not run")))
    state = SimpleNamespace(labels=[])
    for c, metrics in ((_cell(None), {"decode_tokens_per_s": 1.0}), (_cell({"x": 1}), {})):
        method: dict = {}
        cell._add_roofline(state, c, metrics, method)
        assert method == {} and state.labels == []


def test_a_failed_roofline_is_a_note_and_keeps_the_timings(monkeypatch):
    def broken(*_):
        raise KeyError("no such layer")

    monkeypatch.setattr(cell, "_roofline", broken)
    state = SimpleNamespace(labels=[])
    metrics, method = {"decode_tokens_per_s": 10.0, "ttft_ms": 3.0}, {}
    cell._add_roofline(state, _cell({"cpu": {}}), metrics, method)
    assert metrics == {"decode_tokens_per_s": 10.0, "ttft_ms": 3.0}
    assert method["roofline_error"].startswith("roofline not computed: KeyError") and state.labels == [
        method["roofline_error"]]


def test_a_roofline_adds_its_figures_and_method(monkeypatch):
    monkeypatch.setattr(cell, "_roofline", lambda state, c, metrics: {"roofline_fraction": 0.25})
    metrics, method = {"decode_tokens_per_s": 10.0}, {}
    cell._add_roofline(SimpleNamespace(labels=[]), _cell({"cpu": {}}), metrics, method)
    assert metrics["roofline_fraction"] == 0.25 and "decode bytes/step" in method["roofline"]
