"""Each measurement of a cell is one call with one job: memory, roofline (latency and drift run in the runner tests)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from bench.cells import Cell
from bench.metrics import memory_cell, roofline_cell
from bench.metrics.roofline_cell import add_roofline
from bench.scenarios import GenerateScenario
from optimize.recipe import Recipe


def _cell(ceilings) -> Cell:
    return Cell(model="m", recipe=Recipe(name="fp32"), device="cpu", scenario=GenerateScenario(), ceilings=ceilings)


def test_memory_on_cpu_is_the_peak_rss_its_increase_and_the_load_and_serving_windows(monkeypatch):
    from bench.metrics import memory

    peaks = iter([9000, 5000])  # getrusage at the end of load, then after the run (the reset restarted it)
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: next(peaks))
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: True)
    monkeypatch.setattr(memory, "vm_hwm_bytes", lambda: 4990)
    load = memory_cell.close_load_window("cpu")
    assert load == {"peak_rss_bytes": 9000, "reset": True}
    assert memory_cell.measure_memory("cpu", 1200, load) == ({"peak_memory_bytes": 9000, "rss_increase_bytes": 7800,
                                                        "load_peak_memory_bytes": 9000,
                                                        "serving_peak_memory_bytes": 4990}, {})
    # A run whose peak passes the load's sets the cell's peak; the serving peak never exceeds it.
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 4980)
    figures, _ = memory_cell.measure_memory("cpu", 1200, {"peak_rss_bytes": 3000, "reset": True})
    assert figures["peak_memory_bytes"] == 4990
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 6000)
    assert memory_cell.measure_memory("cpu", 1200, {"peak_rss_bytes": 3000, "reset": True})[0] == {
        "peak_memory_bytes": 6000, "rss_increase_bytes": 4800, "load_peak_memory_bytes": 3000,
        "serving_peak_memory_bytes": 4990}


def test_memory_on_cpu_without_a_peak_reset_has_no_serving_figure(monkeypatch):
    from bench.metrics import memory

    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5000)
    monkeypatch.setattr(memory, "vm_hwm_bytes", lambda: (_ for _ in ()).throw(AssertionError("not read")))
    assert memory_cell.measure_memory("cpu", 1200, {"peak_rss_bytes": 3000, "reset": False}) == ({
        "peak_memory_bytes": 5000, "rss_increase_bytes": 3800, "load_peak_memory_bytes": 3000}, {})


def test_memory_on_cuda_is_the_allocator_peak_over_both_windows_plus_host_rss(monkeypatch):
    from bench.metrics import memory

    calls = []
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 5000)
    monkeypatch.setattr(memory, "cuda_peaks", lambda: {"cuda_max_allocated_bytes": 800, "cuda_max_reserved_bytes": 850})
    monkeypatch.setattr(memory, "reset_cuda_peaks", lambda: calls.append("reset"))
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: calls.append("host reset"))
    load = memory_cell.close_load_window("cuda")
    assert calls == ["reset"]  # the host's peak RSS stays the whole cell's
    assert load == {"cuda_max_allocated_bytes": 800, "cuda_max_reserved_bytes": 850}
    run = {"cuda_max_allocated_bytes": 700, "cuda_max_reserved_bytes": 900, "nvml_process_bytes": 1100}
    monkeypatch.setattr(memory, "cuda_memory", lambda: (run, None))
    assert memory_cell.measure_memory("cuda", 1200, load) == ({
        "cuda_max_allocated_bytes": 800, "cuda_max_reserved_bytes": 900, "nvml_process_bytes": 1100,
        "peak_memory_bytes": 800, "load_peak_memory_bytes": 800, "serving_peak_memory_bytes": 700,
        "host_peak_rss_bytes": 5000}, {})
    # NVML had no figure: the method says why, beside method.memory (whose words compare reads)
    monkeypatch.setattr(memory, "cuda_memory", lambda: ({**run, "nvml_process_bytes": None}, "NVML did not start"))
    figures, notes = memory_cell.measure_memory("cuda", 1200, load)
    assert figures["nvml_process_bytes"] is None and notes == {"nvml": "no per-process figure: NVML did not start"}


def test_the_serving_peak_excludes_a_load_transient_and_sees_the_runs_own_memory(peak_rss_resets):
    """Real memory, no stand-ins: 96 MiB held and freed during 'load', 32 MiB during the 'run'.

    Each buffer is its own anonymous mapping, touched page by page and unmapped after: memory an
    earlier test freed into the allocator's heap would otherwise serve the 'run' without growing the RSS.
    """
    import mmap

    import numpy as np

    from bench.metrics import memory

    def touched(nbytes: int) -> mmap.mmap:
        buffer = mmap.mmap(-1, nbytes)  # fresh pages from the kernel, resident once written
        np.frombuffer(buffer, dtype=np.uint8)[:] = 1
        return buffer

    mib = 2**20
    baseline = memory.rss_bytes()
    touched(96 * mib).close()
    load = memory_cell.close_load_window("cpu")
    during_run = touched(32 * mib)
    rss_during_run = memory.rss_bytes()
    during_run.close()
    out, _ = memory_cell.measure_memory("cpu", baseline, load)
    assert out["load_peak_memory_bytes"] >= baseline + 90 * mib
    assert out["peak_memory_bytes"] == max(out["load_peak_memory_bytes"], memory.peak_rss_bytes())
    # The kernel's RSS counters are batched per CPU: the two readings may differ by a few pages.
    assert rss_during_run - 4 * mib <= out["serving_peak_memory_bytes"] <= out["load_peak_memory_bytes"] - 50 * mib
    assert out["serving_peak_memory_bytes"] >= baseline + 28 * mib


def test_roofline_is_skipped_without_ceilings_or_prefill_figures(monkeypatch):
    must_not_run = AssertionError("must not run")
    monkeypatch.setattr(roofline_cell, "roofline_figures", lambda *a: (_ for _ in ()).throw(must_not_run))
    state = SimpleNamespace(labels=[])
    for c, metrics in ((_cell(None), {"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0}),
                       (_cell({"x": 1}), {"decode_tokens_per_s": 1.0})):
        method: dict = {}
        add_roofline(state, c, metrics, method)
        assert method == {} and state.labels == []


def test_a_failed_roofline_is_a_note_and_keeps_the_timings(monkeypatch):
    def broken(*_):
        raise KeyError("no such layer")

    def long_error(*_):
        raise ValueError("x" * 400 + "\nsecond line")

    monkeypatch.setattr(roofline_cell, "roofline_figures", long_error)
    method: dict = {}
    add_roofline(SimpleNamespace(labels=[]), _cell({"cpu": {}}), {"prefill_tokens_per_s": 5.0}, method)
    assert method == {"roofline_error": "roofline not computed: ValueError: " + "x" * 299 + "\u2026"}  # first line, cut

    monkeypatch.setattr(roofline_cell, "roofline_figures", broken)
    state = SimpleNamespace(labels=[])
    metrics, method = {"decode_tokens_per_s": 10.0, "prefill_tokens_per_s": 5.0, "ttft_ms": 3.0}, {}
    add_roofline(state, _cell({"cpu": {}}), metrics, method)
    assert metrics == {"decode_tokens_per_s": 10.0, "prefill_tokens_per_s": 5.0, "ttft_ms": 3.0}
    assert method["roofline_error"].startswith("roofline not computed: KeyError") and state.labels == [
        method["roofline_error"]]


def test_a_roofline_adds_its_figures_and_method(monkeypatch):
    seen = []

    def roofline(state, c, metrics, manifest):
        seen.append((state.name, c.cache_dir, manifest))
        if "decode_tokens_per_s" not in metrics:  # the prefill sweep; here with no ceiling of its dtype
            return {"prefill_tflops": 1.0, "roofline_ceilings": {"bandwidth_gbps": 1.0}}, "HOW"
        ceilings = {"bandwidth_gbps": 1.0, "matmul_dtype": "float32", "matmul_backend": "onnxruntime"}
        return {"roofline_fraction": 0.25, "prefill_flops_fraction": 0.5, "roofline_ceilings": ceilings}, "HOW"

    monkeypatch.setattr(roofline_cell, "roofline_figures", roofline)
    metrics, method = {"decode_tokens_per_s": 10.0, "prefill_tokens_per_s": 5.0}, {}
    c = dataclasses.replace(_cell({"cpu": {}}), cache_dir="CACHE")
    add_roofline(SimpleNamespace(labels=[], name="STATE", generate_kwargs={}), c, metrics, method,
                       {"embedding_table_bytes": 8})
    assert metrics["roofline_fraction"] == 0.25 and method["roofline"] == (
        "decode bytes/step = weights (less an untied input embedding) + batch x mean context x KV bytes/token "
        "(KV shape read off a real cache); prefill FLOPs counted by torch.utils.flop_counter on the architecture, HOW; "
        "prefill fraction of the fastest measured float32 matmul (onnxruntime); the variant computes in float32 here")
    quantized = SimpleNamespace(labels=[], name="STATE", generate_kwargs={"cache_implementation": "quantized"})
    add_roofline(quantized, c, dict(metrics), method)
    assert method["roofline"].startswith(
        "decode bytes/step = weights (less an untied input embedding) + batch x mean context x KV bytes/token "
        "(KV shape read off a real cache; a quantized cache's bytes, scales and full-precision tail included, held "
        "over this decode); prefill FLOPs")
    # the cell's state, the cell and the stored artifact's manifest reach the roofline
    assert seen == [("STATE", "CACHE", {"embedding_table_bytes": 8}), ("STATE", "CACHE", None)]
    prefill_only, method = {"prefill_tokens_per_s": 5.0}, {}  # the prefill sweep: its FLOP figures, no decode words
    add_roofline(SimpleNamespace(labels=[], name="STATE", generate_kwargs={}), c, prefill_only, method)
    assert prefill_only == {"prefill_tokens_per_s": 5.0, "prefill_tflops": 1.0,
                            "roofline_ceilings": {"bandwidth_gbps": 1.0}}
    assert method["roofline"] == ("prefill FLOPs counted by torch.utils.flop_counter on the architecture, HOW; no "
                                  "prefill fraction: no float32 matmul could be measured on this device")


def test_the_roofline_method_names_the_dtype_the_variant_computes_in_on_its_own_device(monkeypatch):
    """bitsandbytes' 4-bit kernel on an AVX512-BF16 CPU computes in bf16 whatever its recipe says; on CUDA it
    computes in its compute dtype: the method must say what the cell's device runs."""
    from optimize.quantize import bnb

    monkeypatch.setattr(bnb, "_cpu_repacks_4bit", lambda: True)
    monkeypatch.setattr(roofline_cell, "roofline_figures", lambda *a: ({"roofline_ceilings": {}}, "HOW"))
    nf4 = dataclasses.replace(_cell({"cpu": {}}), recipe=Recipe(name="nf4", steps=(bnb.BnbNF4(),)))
    said = {}
    for device in ("cpu", "cuda"):
        method: dict = {}
        add_roofline(SimpleNamespace(labels=[], generate_kwargs={}), dataclasses.replace(nf4, device=device),
                     {"prefill_tokens_per_s": 5.0}, method)
        said[device] = method["roofline"].rsplit("; ", 1)[1]
    assert said == {"cpu": "no prefill fraction: no bfloat16 matmul could be measured on this device",
                    "cuda": "no prefill fraction: no float32 matmul could be measured on this device"}


def test_a_roofline_failing_with_an_empty_message_is_a_note_not_a_lost_cell(monkeypatch):
    """The note names the exception's type, and its message's first line where it has one."""
    def empty(*args):
        raise KeyError()

    monkeypatch.setattr(roofline_cell, "roofline_figures", empty)
    method, state = {}, SimpleNamespace(labels=[], name="STATE", generate_kwargs={})
    add_roofline(state, _cell({"cpu": {}}), {"prefill_tokens_per_s": 5.0}, method)
    assert method["roofline_error"] == "roofline not computed: KeyError" and state.labels == [method["roofline_error"]]

    def two_lines(*args):
        raise RuntimeError("first\nsecond")

    monkeypatch.setattr(roofline_cell, "roofline_figures", two_lines)
    add_roofline(state, _cell({"cpu": {}}), {"prefill_tokens_per_s": 5.0}, method)
    assert method["roofline_error"] == "roofline not computed: RuntimeError: first"


def test_onnx_runtime_on_cuda_counts_its_own_arena_not_only_torchs_allocator():
    """torch's allocator holds only the I/O-bound buffers of an ONNX Runtime cell: the weights live in ORT's arena."""
    base = {"peak_memory_bytes": 300, "load_peak_memory_bytes": 100, "serving_peak_memory_bytes": 300,
            "cuda_max_allocated_bytes": 300, "weights_bytes": 5000}
    metrics = {**base, "nvml_process_bytes": 9000}
    text = memory_cell.onnx_runtime_cuda_memory(metrics)
    assert metrics == {**base, "nvml_process_bytes": 9000, "peak_memory_bytes": 9000, "serving_peak_memory_bytes": 9000}
    assert text.startswith("NVML device memory of the cell process")
    assert metrics["peak_memory_bytes"] == max(metrics["load_peak_memory_bytes"], metrics["serving_peak_memory_bytes"])
    without = {**base, "nvml_process_bytes": None}
    text = memory_cell.onnx_runtime_cuda_memory(without)
    assert (without["peak_memory_bytes"], without["serving_peak_memory_bytes"]) == (5300, 5300)
    assert text.startswith("a lower bound: torch's allocator peak") and "method.nvml" in text
    assert without["cuda_max_allocated_bytes"] == 300  # the allocator's own figure stays what it measured
