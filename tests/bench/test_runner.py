"""The isolated runner: truthful timing, and failures that stay in their cell."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.launchers.local import LocalLauncher
from bench.matrix import load_matrix, narrow
from bench.orchestrate import execute, start_run
from bench.results import read_records, read_run, validate_record
from tests.bench.faulty import make_faulty

PROMPT, NEW = 256, 24  # a long prompt keeps TTFT well above generate()'s fixed ~0.5 ms of Python
# One torch thread on each side: on 2 cores a busy neighbour process then takes the other core
# instead of preempting one of the measured process's threads, which stalls every parallel
# region of the other (a spinning neighbour made TTFT swing 0.04-1.3x between pairs with 2 threads).
THREADS = 1
REPS = 10  # calls per window and side, after the harness's default 2 warm-up calls
BATCH = 8  # harness windows per run (its rounds), each followed at once by an independent window
MAX_WINDOWS = 32
# The standard error of the log ratio at which no more windows are taken: 15% is then 2.8 standard
# errors away (log 1.15 = 0.14). 8 windows reach it on a quiet machine; a busy one takes all 32.
TARGET_SE = 0.05
SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "benchmarks" / "direct_generate.py"


class _Independent:
    """Windows of TTFT and decode time of the same generate call, timed from outside the harness.

    ``ci/benchmarks/direct_generate.py --serve`` imports the libraries, then for each
    window asked of it forks a child that loads the model with plain transformers (or, given
    ``onnx_dir``, the exported graph with optimum's ONNX Runtime model), warms it up as the
    harness does and times ``REPS`` ``generate`` calls with perf_counter: TTFT is the wall time
    of a one-token call, the decode time the extra time an N-token call takes; one- and N-token
    calls alternate. Each window runs in a process as young as a harness cell and started the
    same way (a fork of an interpreter that has imported the libraries), so a difference
    between the two sides is the harness's, not the age or the start of a process.
    """

    def __init__(self, onnx_dir: Path | None, log: Path, static_kv: bool = False):
        graph = ["--onnx-dir", str(onnx_dir)] if onnx_dir else []
        graph += ["--static-kv"] if static_kv else []
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--model", "synthetic:llama-tiny", "--prompt-tokens", str(PROMPT),
                 "--new-tokens", str(NEW), "--reps", str(REPS), "--warmup", "2", "--threads", str(THREADS),
                 "--serve", *graph], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def window(self) -> dict:
        """(TTFT, decode time) in ms: the fastest one-token call, and the fastest N-token call less it."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"direct_generate.py --serve ended (exit {self.proc.wait()}): {self.log.read_text()[-2000:]}"
        s = json.loads(line)["samples"]
        return {"ttft": min(s["ttft_ms"]), "decode": min(s["e2e_ms"]) - min(s["ttft_ms"])}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _log_ratio(harness: list[float], independent: list[float]) -> tuple[float, float]:
    """Mean log window time of the harness less the independent side's, and its standard error."""
    h, i = [math.log(x) for x in harness], [math.log(x) for x in independent]
    se = math.sqrt(statistics.variance(h) / len(h) + statistics.variance(i) / len(i))
    return statistics.fmean(h) - statistics.fmean(i), se


def _stored_artifact(tiny_ref, variant: str, cache_dir) -> Path:
    """The folder of ``variant``'s stored artifact (built by the harness's run before this is called)."""
    from optimize.registry import builtin_variant
    from optimize.store import VariantStore

    return VariantStore(cache_dir).get_or_build(tiny_ref, builtin_variant(variant), "cpu").path


# fp32: plain transformers; onnx-fp32: the exported graph in ONNX Runtime, through optimum; static-kv: the
# static-cache loop with its compiled step (no per-token stamp on the independent side)
@pytest.mark.truth
@pytest.mark.parametrize("variant", ["fp32", "onnx-fp32", "static-kv"])
def test_harness_timing_agrees_with_independent_measurement(tmp_path, tiny_ref, cache_dir, variant):
    """Harness and independent timing in interleaved windows: their ratio must be within 15% of 1.

    This machine's speed swings within seconds, below anything a process can see: one loop of
    the same generate call, alone on an idle machine, took 72-140 ms to decode within 7 s, and
    the fastest call of a window of ten varied 35-75 ms from one window to the next. So the two
    sides take many short windows in turn, seconds apart: each harness cell (a round of one
    run, through the real runner and its fork server) is followed at once by an independent
    window, taken while the harness waits between cells. A window's fastest call estimates its
    cost in that moment (interference only adds time); the ratio is that of the geometric means
    of the two sides' window figures, and windows are added, up to ``MAX_WINDOWS``, until the
    ratio's standard error (from the windows' own scatter, never from the ratio) is at most
    ``TARGET_SE``. A harness that adds time of its own (polling, synchronisation, a thread count
    other than the one asked for) adds it to every window and fails.
    """
    base = narrow(load_matrix(), models=["synthetic:llama-tiny"], variants=[variant], devices=["cpu"],
                  batch_size=[1], prompt_tokens=[PROMPT], new_tokens=[NEW],
                  repeat={"warmup": 2, "min_reps": REPS, "budget_s": 0}, threads=THREADS, drift=False)
    # A first run builds the variant and measures the ceilings; the measured runs reuse both.
    first = tmp_path / "first"
    first.mkdir()
    start_run(base, first, shard=None, launcher="local", environment={})
    [record] = execute(base, first, LocalLauncher(first / "logs"), cache_dir=str(cache_dir))
    assert record["status"] == "ok", record["error"]
    ceilings = read_run(first)["roofline"]
    matrix = dataclasses.replace(base, measure=dataclasses.replace(base.measure, rounds=BATCH))
    onnx_dir = _stored_artifact(tiny_ref, variant, cache_dir) if variant.startswith("onnx") else None
    independent = _Independent(onnx_dir, tmp_path / "independent.log", static_kv=variant == "static-kv")
    harness_windows, independent_windows = [], [independent.window()]

    def after_cell(kind: str, info: dict) -> None:
        if kind == "cell":  # the runner starts the next cell when this returns
            independent_windows.append(independent.window())

    try:
        while True:
            run_dir = tmp_path / f"run{len(harness_windows) // BATCH}"
            run_dir.mkdir()
            start_run(matrix, run_dir, shard=None, launcher="local", environment={},
                      extra={"roofline": ceilings})
            execute(matrix, run_dir, LocalLauncher(run_dir / "logs"), cache_dir=str(cache_dir), on_event=after_cell)
            records = read_records(run_dir, latest_only=False)  # one per round
            assert len(records) == BATCH
            for record in records:
                assert record["status"] == "ok", record["error"]
                validate_record(record)
                assert record["method"]["torch_threads"] == THREADS
                if variant.startswith("onnx"):
                    assert record["method"]["ort_intra_op_threads"] == THREADS
                # measurement sanity: never far above the ceiling
                assert 0 < record["metrics"]["roofline_fraction"] <= 1.1, record["metrics"]["roofline_fraction"]
                s = record["samples"]
                harness_windows.append({"ttft": min(s["ttft_ms"]),
                                        "decode": min(e - t for e, t in zip(s["e2e_ms"], s["ttft_ms"], strict=True))})
            ratios = {k: _log_ratio([w[k] for w in harness_windows], [w[k] for w in independent_windows])
                      for k in ("ttft", "decode")}
            if all(se <= TARGET_SE for _, se in ratios.values()) or len(harness_windows) >= MAX_WINDOWS:
                break
    finally:
        independent.close()
    result = {k: {"ratio": round(math.exp(m), 3), "se": round(se, 3)} for k, (m, se) in ratios.items()}
    print(json.dumps({"windows": len(harness_windows), **result,
                      "harness": [{k: round(v, 2) for k, v in w.items()} for w in harness_windows],
                      "independent": [{k: round(v, 2) for k, v in w.items()} for w in independent_windows]}))
    assert math.exp(ratios["decode"][0]) == pytest.approx(1.0, rel=0.15), result
    assert math.exp(ratios["ttft"][0]) == pytest.approx(1.0, rel=0.15), result


@pytest.mark.slow
def test_harness_memory_agrees_with_independent_measurement(tmp_path, cache_dir):
    """A cell's memory growth over its pre-load baseline against a plain process's, both as the kernel counts it.

    A Llama of 40M parameters (160 MB of fp32 weights, so the load dominates) saved to a
    directory; the harness's fp32 cell (``rss_increase_bytes``: peak RSS less the RSS before
    the load) and ``ci/benchmarks/direct_generate.py`` (VmHWM less VmRSS after its imports)
    load it and generate the same tokens. Measured: 173 vs 171, 177 vs 177 and 173 vs 174 MiB. Before
    a job made the fork server's library pages resident again (``bench.metrics.resident``), the
    harness counted those it touched as growth: 194 vs 172 and 194 vs 179, and 256 vs 193 once inside
    the parallel suite. A busy machine adds to a process's growth (allocator state), never takes the
    weights away: each side's figure is the smallest of its attempts, and a disagreement is measured
    again, both sides, up to three times. A peak read before the run, or in another process, misses
    the weights: safetensors maps them lazily, and only generation makes them resident.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=16000, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model_dir = tmp_path / "llama-42m"
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)
    weights = sum(p.numel() * 4 for p in LlamaForCausalLM(config).parameters())
    shape = ["--prompt-tokens", "64", "--new-tokens", "8", "--threads", "1"]
    mib = 2**20
    harness, direct = [], []
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", str(model_dir), "--variants",
                               "fp32", "--device", "cpu", "--batch-size", "1", *shape, "--no-drift", "--min-reps", "2",
                               "--max-reps", "2", "--warmup", "0", "--budget-s", "0", "--out", str(run_dir), "--quiet",
                               "--no-report"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        [record] = read_records(run_dir)
        assert record["status"] == "ok", record["error"]
        out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), *shape, "--reps", "2"],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        harness.append(record["metrics"]["rss_increase_bytes"])
        direct.append(measured["peak_rss_bytes"] - measured["rss_baseline_bytes"])
        print(json.dumps({"harness_growth_mib": harness[-1] / mib, "direct_growth_mib": direct[-1] / mib,
                          "weights_mib": weights / mib}))
        harness_growth, direct_growth = min(harness), min(direct)
        if abs(harness_growth - direct_growth) <= 0.10 * direct_growth + 16 * mib:
            break
    assert direct_growth >= 0.9 * weights  # the weights dominate both sides' growth: the comparison means something
    assert abs(harness_growth - direct_growth) <= 0.10 * direct_growth + 16 * mib, (harness, direct)


# Every cell of the matrix gets it: ten times what a cell of this shape takes on a loaded 2-core
# machine (1-2 s), and the test waits it out once, for the hanging cell. The cells run one torch
# thread: with two, a neighbour that preempts one stalls the other at every parallel region, and a
# cell that takes 1 s alone took over 20 s beside the rest of the suite.
HANG_TIMEOUT_S = 20


@pytest.mark.slow
def test_failing_cells_are_recorded_and_the_matrix_goes_on(tmp_path, tiny_ref, cache_dir):
    """Each failure is its cell's record, saying what the process was doing when it ended (a hung or
    crashed process cannot say so itself: the parent reads the phase the job kept beside its log)."""
    base = Path(tiny_ref.path)
    # abort in the warm-up call, hang in the second measured repetition
    models = [make_faulty(base, tmp_path / "faulty-raise", "raise"), make_faulty(base, tmp_path / "faulty-abort",
              "abort"), make_faulty(base, tmp_path / "faulty-hang", "hang", on_call=3)]
    matrix = narrow(load_matrix(), models=[str(m) for m in models] + ["synthetic:llama-tiny"], variants=["fp32"],
                    devices=["cpu"],
                    batch_size=[1], prompt_tokens=[16], new_tokens=[4], trust_remote_code=True, threads=1,
                    repeat={"warmup": 1, "min_reps": 3, "max_reps": 3, "budget_s": 0}, timeout_s=HANG_TIMEOUT_S,
                    drift=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    records = {Path(r["model"]).name: r for r in execute(matrix, run_dir, LocalLauncher(run_dir / "logs"),
                                                           cache_dir=str(cache_dir))}
    assert records["synthetic:llama-tiny"]["status"] == "ok"
    assert records["faulty-raise"]["status"] == "failed"
    assert "forward raised on purpose" in records["faulty-raise"]["error"]
    assert records["faulty-abort"]["status"] == "failed"
    assert "died with signal SIGABRT while warming up: call 1 of 1 (last step " in records["faulty-abort"]["error"]
    assert records["faulty-hang"]["status"] == "failed"
    hang = records["faulty-hang"]["error"].splitlines()[0]
    assert re.fullmatch(rf"timed out after {HANG_TIMEOUT_S} s \(process group killed\) while measuring: "
                        r"1 repetition done in \d+\.\d s \(min_reps 3, max_reps 3, budget_s 0\) "
                        r"\(last step (\d+\.\d) s before the end\)", hang), hang
    assert float(hang.rsplit("last step ", 1)[1].split()[0]) >= HANG_TIMEOUT_S / 2  # hung long after its step
    assert len(list((run_dir / "logs").glob("*.phase.json"))) == 2  # kept for the two jobs that left no result
    for record in records.values():
        validate_record(record)
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["cell_id"] for line in lines)
    assert len(read_records(run_dir)) == 4


@pytest.mark.slow
def test_a_cell_that_dies_or_hangs_while_scoring_drift_keeps_its_speed_and_memory_figures(tmp_path, cache_dir):
    """Drift runs after the figures are taken; a timeout or a crash in it (a compiled step compiling again
    for drift's batch, a native fault) costs the drift alone: the record is ok, its drift failed, and why."""
    from optimize.models import resolve_model

    base = Path(resolve_model("builtin:pycode", cache_dir).path)  # drift scores text: a model with a tokenizer
    faults = {name: make_faulty(base, tmp_path / f"drift-{name}", name, min_batch=2, dtypes=("torch.bfloat16",))
              for name in ("hang", "abort")}
    matrix = narrow(load_matrix(), models=[str(m) for m in faults.values()], variants=["fp32", "bf16"], devices=["cpu"],
                    batch_size=[1], prompt_tokens=[16], new_tokens=[4], trust_remote_code=True, threads=1,
                    repeat={"warmup": 1, "min_reps": 3, "max_reps": 3, "budget_s": 0}, timeout_s=HANG_TIMEOUT_S,
                    drift=True)
    matrix = dataclasses.replace(matrix, drift=dataclasses.replace(matrix.drift, context=32, max_tokens=256))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    everything = execute(matrix, run_dir, LocalLauncher(run_dir / "logs"), cache_dir=str(cache_dir))
    records = {Path(r["model"]).name.removeprefix("drift-"): r for r in everything if r["variant"] == "bf16"}
    for record in everything:  # the phases add up to the total, a killed drift's wall time included
        timing = record["timing_s"]
        phases = sum(timing[k] for k in ("load", "warmup", "measure", "drift", "overhead"))
        assert timing["overhead"] >= 0 and phases == pytest.approx(timing["total"], abs=0.005), timing
    fp32 = [r for r in everything if r["variant"] == "fp32"]
    assert len(fp32) == 2 and all(r["status"] == "ok" and r["drift_ok"] is True for r in fp32)  # fp32 never faults
    for name, record in records.items():
        validate_record(record)
        assert record["status"] == "ok" and record["error"] is None, (name, record.get("error"))
        assert record.get("drift_ok") is False and "kld_mean" not in record["metrics"], (name, record)
        assert len(record["samples"]["e2e_ms"]) == 3 and record["metrics"]["tpot_ms"]["p50"] > 0
        assert record["metrics"]["peak_memory_bytes"] > 0 and record["metrics"]["prefill_flops_fraction"] > 0
        assert record["method"]["memory"] and record["method"]["torch_threads"] >= 1
        assert record["timing_s"]["drift"] > 0 and record["timing_s"]["process_wall"] > record["timing_s"]["measure"]
    hang = records["hang"]["drift_error"].splitlines()[0]
    assert hang.startswith(f"timed out after {HANG_TIMEOUT_S} s (process group killed) while scoring drift"), hang
    assert records["hang"]["timing_s"]["drift"] >= HANG_TIMEOUT_S / 2  # the drift's wall time, up to the kill
    assert records["abort"]["drift_error"].startswith("cell process died with signal SIGABRT while scoring drift")
    # kept where a job ended without its result (the two bf16 cells); a finished job's is removed (fp32's)
    assert len(list((run_dir / "logs").glob("*.provisional.json"))) == 2
    from bench.report.markdown import note_items

    notes = [text for _, text in note_items(list(records.values()))]
    assert f"drift failed: {hang}" in notes  # the cause, not the log tail's last line


CELL_TIMEOUT_S = 1200


def _hanging_run(tmp_path, tiny_ref, prefix: list[str]):
    """``infermatrix run`` (``prefix`` is how Python is started) of one cell whose forward hangs, in a session
    of its own; returns the command's process and the hanging cell's, once the cell hangs."""
    import os
    import time

    import psutil

    from tests.bench.test_failure_modes import _matrix_file

    model = make_faulty(Path(tiny_ref.path), tmp_path / "faulty-hang", "hang")
    matrix = _matrix_file(tmp_path, extra="trust_remote_code = true")
    # a cell timeout far past the waits of the tests, which leaves a busy machine minutes to take the cell down
    matrix.write_text(matrix.read_text().replace('"synthetic:llama-tiny"', json.dumps(str(model)))
                      .replace("timeout_s = 120", f"timeout_s = {CELL_TIMEOUT_S}"))
    marker = tmp_path / "hanging.pid"
    cli = subprocess.Popen([*prefix, "run", str(matrix), "--out", str(tmp_path / "run"), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "FAULTY_HANG_MARKER": str(marker), "PYTHONFAULTHANDLER": "1"},
                           cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
        time.sleep(0.2)
    return cli, psutil.Process(int(marker.read_text()))


def _still_running(procs) -> list:
    """Of ``procs``, those alive 60 s on (a zombie has ended; only its parent has not reaped it yet)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=60)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_ctrl_c_takes_the_running_cell_down_and_exits_130_without_a_traceback(tmp_path, tiny_ref, cache_dir):
    """The cell leads its own session, out of the terminal's reach: SIGINT to the command must end it.

    Seen: the command printed "interrupted" and then waited minutes for a cell that went on
    measuring at 100% CPU (multiprocessing joins its children at exit), or left it orphaned.
    """
    import os
    import signal

    import psutil

    # SIGINT as a terminal's user has it: a suite started as a background job of a non-interactive shell
    # (`(make test &)`) runs with SIGINT ignored, which every process it starts inherits and Python keeps.
    as_in_a_terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "runpy.run_module('bench.cli', run_name='__main__', alter_sys=True)")
    cli, cell = _hanging_run(tmp_path, tiny_ref, [sys.executable, "-c", as_in_a_terminal])
    try:
        started = [p for p in psutil.Process(cli.pid).children(recursive=True)]
        assert cell in started  # forked from the command's fork server, in a session of its own
        assert os.getsid(cell.pid) != os.getsid(cli.pid)
        cli.send_signal(signal.SIGINT)
        try:
            _, err = cli.communicate(timeout=CELL_TIMEOUT_S / 4)  # not the cell's timeout
        except subprocess.TimeoutExpired:  # where the command is stuck: faulthandler prints every thread's stack
            cli.send_signal(signal.SIGABRT)
            pytest.fail(f"no exit {CELL_TIMEOUT_S / 4:g} s after SIGINT; its stacks and stderr:\n"
                        f"{cli.communicate(timeout=30)[1][-6000:]}")
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    assert cli.returncode == 130, err
    assert "infermatrix: interrupted; finished cells are in the run directory" in err
    assert "Traceback" not in err, err
    alive = _still_running(started)  # the fork server ends once the command has
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_run_terminated_or_killed_leaves_no_job_running(tmp_path, tiny_ref, cache_dir, sig):
    """SIGTERM (a CI job cancelled) ends the command as Ctrl-C does; SIGKILL cannot be caught, but the job
    still dies with the fork server, which exits with the command.

    Seen: after either, the job went on measuring at 200% CPU past its own timeout: its death signal follows
    the fork server, which every job kept up through its copy of the server's "alive" pipe; the
    ``--resume`` that followed timed out its cells beside it.
    """
    import os
    import signal

    cli, cell = _hanging_run(tmp_path, tiny_ref, [sys.executable, "-m", "bench.cli"])
    server = cell.parent()  # the fork server
    try:
        cli.send_signal(getattr(signal, sig))
        cli.wait(timeout=300)  # not communicate(): an orphan would hold the output pipes open
        alive = _still_running([cell, server])
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
        for proc in (cell, server):  # where the test fails: no orphan left hanging for an hour
            if proc.is_running():
                proc.kill()
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    _, err = cli.communicate(timeout=60)
    if sig == "SIGKILL":
        assert cli.returncode == -signal.SIGKILL
    else:
        assert cli.returncode == 128 + signal.SIGTERM, err
        assert "infermatrix: terminated by SIGTERM; finished cells are in the run directory" in err
        assert "Traceback" not in err, err
