"""``infermatrix build`` gives one answer whatever the store holds, and keeps library noise off the console."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest

from bench.cli import main as cli
from bench.commands.build import BUILD_LOG

FP16_ON_CPU = "fp16 needs CUDA: CPU matmuls have no fast fp16 kernels here (use bf16)"


def _build(capfd, cache, variants: str) -> tuple[int, dict[str, dict], str]:
    """Exit code, each variant's printed answer, and what reached stderr."""
    rc = cli(["build", "--model", "synthetic:llama-tiny", "--device", "cpu", "--variants", variants,
              "--cache-dir", str(cache)])
    out, err = capfd.readouterr()
    answers = [json.loads(line) for line in out.splitlines()]
    return rc, {a["variant"]: a for a in answers}, err


def _without_timing(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "build_s"}


def test_build_skips_a_cuda_runtime_step_the_same_way_with_an_empty_and_a_filled_store(tmp_path, capfd):
    # prune-2of4-fp16 saves what prune-2of4 saves: the first build stores that artifact, the second finds it.
    # fp16 and torchao-int4-wo save nothing: their only steps run when the variant is loaded.
    variants = "prune-2of4-fp16,fp16,torchao-int4-wo"
    rc, first, err = _build(capfd, tmp_path, variants)
    assert rc == 0 and err == ""
    assert [p.name for p in (tmp_path / "variants").iterdir() if (p / "manifest.json").exists()] != []
    rc, second, err = _build(capfd, tmp_path, variants)
    assert rc == 0 and err == ""
    assert list(second) == list(first) == variants.split(",")
    for name in first:
        assert _without_timing(second[name]) == _without_timing(first[name]), name
        assert second[name]["status"] == "skipped" and "reused" not in second[name], name
    assert first["prune-2of4-fp16"]["error"] == first["fp16"]["error"] == FP16_ON_CPU
    assert first["torchao-int4-wo"]["error"].startswith("torchao int4 weight-only needs CUDA")


def test_a_skipped_runtime_step_does_not_skip_another_recipe_on_the_same_artifact(tmp_path, capfd):
    rc, skipped, _ = _build(capfd, tmp_path, "prune-2of4-fp16")
    assert skipped["prune-2of4-fp16"]["status"] == "skipped"
    rc, answers, err = _build(capfd, tmp_path, "prune-2of4")
    answer = answers["prune-2of4"]
    assert rc == 0 and err == ""
    assert (answer["status"], answer["reused"], answer["runtime_steps"]) == ("ok", True, ["sparse-2of4-kernels"])


@pytest.fixture
def noisy_pruning(monkeypatch):
    """prune-magnitude that prints, logs through a handler it creates and writes to fds 1 and 2, as libraries do."""
    from optimize.prune.magnitude import MagnitudePrune

    apply = MagnitudePrune.apply
    logger = logging.getLogger("infermatrix-test-noisy-library")
    logger.propagate = False

    def noisy(self, state):
        print("noise: print to stdout")
        print("noise: print to stderr", file=sys.stderr)
        os.write(1, b"noise: fd 1\n")
        os.write(2, b"noise: fd 2\n")
        logger.addHandler(logging.StreamHandler())  # binds sys.stderr as it is now, as torch's handler does
        logger.warning("noise: logging warning")
        return apply(self, state)

    monkeypatch.setattr(MagnitudePrune, "apply", noisy)
    yield logger
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)


NOISE = ("noise: print to stdout", "noise: print to stderr", "noise: fd 1", "noise: fd 2", "noise: logging warning")


def test_build_sends_what_techniques_print_to_the_build_log_not_the_console(tmp_path, capfd, noisy_pruning):
    rc, answers, err = _build(capfd, tmp_path, "prune-50")
    answer = answers["prune-50"]
    assert rc == 0 and err == "" and list(answers) == ["prune-50"]  # stdout: the one JSON line, nothing else
    assert answer["status"] == "ok" and answer["reused"] is False
    assert answer["log"] == str(tmp_path / BUILD_LOG)
    log = (tmp_path / BUILD_LOG).read_text()
    assert "build prune-50 of synthetic:llama-tiny on cpu" in log
    for line in NOISE:
        assert line in log, line


def test_an_error_raised_while_output_goes_to_the_log_still_reaches_the_console(tmp_path, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where torch sees no CUDA device, so --device cuda is refused")
    rc = cli(["build", "--variants", "fp32", "--device", "cuda", "--cache-dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert rc == 2 and out == ""
    refusal = "infermatrix build: error: --device cuda asked for, but torch sees no CUDA device"
    assert err.strip().splitlines() == [refusal]


@pytest.mark.slow
def test_a_run_measures_the_recipe_whose_runtime_steps_can_run_and_skips_the_other_on_one_artifact(tmp_path):
    """prune-2of4 and prune-2of4-fp16 share one artifact and one build job in a run.

    Seen: on a CPU with an empty store both cells were recorded "skipped: build: fp16 needs CUDA"
    (the build validated the artifact with the fp16 recipe's runtime steps), and a later run,
    finding the artifact stored, measured prune-2of4: the answer depended on the store.
    """
    import subprocess

    from bench.results import read_records

    for attempt in ("empty store", "filled store"):
        out = tmp_path / attempt.replace(" ", "-")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cli", "run", "--model", "synthetic:llama-tiny",
             "--variants", "prune-2of4-fp16,prune-2of4", "--device", "cpu", "--batch-size", "1",
             "--prompt-tokens", "16", "--new-tokens", "4", "--warmup", "0", "--min-reps", "1", "--max-reps", "1",
             "--budget-s", "0", "--no-drift", "--no-report", "--quiet", "--cache-dir", str(tmp_path / "cache"),
             "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        records = {r["variant"]: r for r in read_records(out)}
        assert records["prune-2of4"]["status"] == "ok", (attempt, records["prune-2of4"].get("error"))
        assert records["prune-2of4-fp16"]["status"] == "skipped", attempt
        assert FP16_ON_CPU in records["prune-2of4-fp16"]["error"], attempt
    # the build's check and the cells encoded their prompts' text once, into the run's own cache
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
