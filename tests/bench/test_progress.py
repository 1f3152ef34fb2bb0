"""Progress lines and the run summary: causes, not traceback headers; brackets survive rich."""

from __future__ import annotations

from pathlib import Path

from bench.progress import Progress, error_cause
from bench.summary import print_summary

SKIP = "bnb-nf4 needs bitsandbytes with CUDA kernels (pip install 'infermatrix[gpu]')"
TRACE = ("Traceback (most recent call last):\n  File \"/x/bench/cell.py\", line 120, in measure\n"
         "    record.update(_measure(cell, record, baseline_rss, t_start))\n"
         "RuntimeError: CUDA error: an illegal memory access was encountered")


def _cell(status: str, error: str | None, model: str = "synthetic:llama-tiny") -> dict:
    return {"cell_id": "0" * 16, "model": model, "variant": "bnb-nf4", "device": "cuda", "status": status,
            "error": error, "scenario": {"name": "generate", "batch_size": 1, "prompt_tokens": 8, "new_tokens": 4},
            "metrics": {}}


def test_error_cause_is_the_exception_line_of_a_traceback():
    assert error_cause(TRACE) == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert error_cause("build: " + TRACE) == "build: RuntimeError: CUDA error: an illegal memory access was encountered"
    tail_only = "\n".join(TRACE.splitlines()[2:])  # cells keep a tail: the header may be cut off
    assert error_cause(tail_only) == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_error_cause_of_a_message_of_several_lines_is_its_first_line():
    """Seen: transformers' unknown-model error ended the progress line with 'You can update Transformers ...'."""
    import json

    message = ("ValueError: The checkpoint you are trying to load has model type `frobnik` but Transformers does "
               "not recognize this architecture.\n\nYou can update Transformers with the command `pip install "
               "--upgrade transformers`.")
    trace = TRACE.rsplit("\n", 1)[0] + "\n    raise ValueError(\n" + message
    assert error_cause(trace) == message.splitlines()[0]
    assert error_cause("build: " + trace) == "build: " + message.splitlines()[0]
    assert error_cause(json.loads(json.dumps(message))) == message.splitlines()[0]  # the message alone


def test_error_tail_keeps_the_start_of_a_long_message():
    from bench.cell import error_tail

    def fail(lines):
        try:
            raise ValueError("the cause\n" + "\n".join(f"detail {i}" for i in range(lines)))
        except ValueError as exc:
            return exc

    long_tail = error_tail(fail(30))
    assert long_tail.splitlines()[0] == "ValueError: the cause" and len(long_tail.splitlines()) == 12
    assert error_cause(long_tail) == "ValueError: the cause"
    short_tail = error_tail(fail(2))
    assert short_tail.splitlines()[-3:] == ["ValueError: the cause", "detail 0", "detail 1"]
    assert any(line.strip().startswith('File "') for line in short_tail.splitlines())  # frames kept
    assert error_cause(short_tail) == "ValueError: the cause"


def test_a_cells_bad_input_is_its_message_alone():
    """Seen in a cell's record: 'optimize.errors.InputError: evaluation text has 7 tokens, ...' after a
    traceback into the harness; bad input names its parameter and fix, and that is the whole line."""
    from bench.cell import error_tail
    from optimize.errors import InputError, RecipeError

    for kind in (InputError, RecipeError):
        try:
            raise kind("evaluation text has 7 tokens, fewer than the 128 of the longest prompt")
        except InputError as exc:
            tail = error_tail(exc)
        assert tail == "evaluation text has 7 tokens, fewer than the 128 of the longest prompt"
        assert error_cause(tail) == tail


def test_error_cause_keeps_the_parents_own_message_first():
    assert error_cause("cell process died with signal SIGSEGV\n" + TRACE) == "cell process died with signal SIGSEGV"
    assert error_cause(SKIP) == SKIP
    assert error_cause(None) == ""


def test_progress_bar_lines_show_brackets_and_the_cause(capsys):
    with Progress(quiet=False) as progress:
        progress.event("plan", {"cells": 2, "done": 0, "todo": 2, "builds": 0})
        progress.event("cell", _cell("skipped", SKIP))
        progress.event("cell", _cell("failed", TRACE))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert "pip install 'infermatrix[gpu]'" in out
    assert "failed (RuntimeError: CUDA error: an illegal memory access was encountered)" in out
    assert "Traceback (most recent call last)" not in out


def test_quiet_progress_lines_show_the_cause(capsys):
    with Progress(quiet=True) as progress:
        progress.event("cell", _cell("failed", TRACE))
        progress.event("roofline", {"device": "cuda", "error": TRACE})
    err = capsys.readouterr().err
    assert "failed (RuntimeError: CUDA error" in err and "roofline cuda: failed (RuntimeError" in err


def test_the_plan_counts_builds_and_drift_reference_passes_apart(capsys):
    with Progress(quiet=True) as progress:
        progress.event("plan", {"cells": 3, "done": 1, "todo": 2, "builds": 1, "references": 2})
        progress.event("plan", {"cells": 1, "done": 0, "todo": 1, "builds": 0, "references": 0})
        progress.event("plan", {"cells": 2, "done": 0, "todo": 2, "builds": 2, "references": 1})
    assert capsys.readouterr().err.splitlines() == [
        "3 cells (1 already done), 1 variant build to make, 2 drift reference passes",
        "1 cell (0 already done), 0 variant builds to make",
        "2 cells (0 already done), 2 variant builds to make, 1 drift reference pass"]


def test_a_cells_round_is_named_counting_from_one(capsys):
    with Progress(quiet=True) as progress:
        progress.event("cell", {**_cell("ok", None), "round": 0})
        progress.event("cell", {**_cell("ok", None), "round": 2})
        progress.event("cell", _cell("ok", None))  # a run of one round
    assert capsys.readouterr().err.splitlines() == [
        "bnb-nf4 b1 p8 n4 cuda round 1: ok", "bnb-nf4 b1 p8 n4 cuda round 3: ok", "bnb-nf4 b1 p8 n4 cuda: ok"]


def test_summary_keeps_brackets_of_paths_and_errors(capsys, tmp_path):
    run_dir = tmp_path / "[gpu]-run"
    print_summary([_cell("skipped", SKIP, model="/models/[exp]/llama")], Path(run_dir))
    out = capsys.readouterr().out
    assert "[gpu]-run" in out and "/models/[exp]/llama" in out
    assert "pip install 'infermatrix[gpu]'" in out
