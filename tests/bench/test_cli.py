"""The command line: help everywhere, one-line errors with exit code 2, lean imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.cli import COMMANDS, main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_available_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: infermatrix {command}" if command else "usage: infermatrix")
    if command is None:  # the top-level help lists every subcommand
        assert all(name in out for name in COMMANDS)


def test_unknown_variant_is_one_line_exit_2_with_suggestion():
    proc = _cli("run", "--variants", "fp23", "--device", "cpu")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown variant 'fp23'" in lines[0] and "did you mean 'fp32'" in lines[0]


def test_bad_matrix_file_names_file_and_key(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('variants = ["fp32"]\nmodles = ["x"]\n')
    proc = _cli("run", str(bad))
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "'modles'" in proc.stderr and "did you mean 'models'" in proc.stderr


def test_bad_flag_value_exits_2():
    proc = _cli("run", "--batch-size", "one")
    assert proc.returncode == 2
    assert "--batch-size takes comma-separated integers" in proc.stderr


@pytest.mark.parametrize("args,parts", [
    (("run", "--drift-protocol", "half"),
     ["infermatrix run: error: argument --drift-protocol: invalid choice: 'half'", "all-but-first", "llama.cpp",
      "(see 'infermatrix run --help')"]),
    (("export", "run-dir", "--to", "nothing"),
     ["infermatrix export: error: argument --to: invalid choice: 'nothing'", "pytest-benchmark",
      "github-action-benchmark", "(see 'infermatrix export --help')"]),
    (("select", "run-dir", "--bogus"),
     ["infermatrix select: error: unrecognized arguments: --bogus", "(see 'infermatrix select --help')"]),
    (("--bogus", "env"), ["infermatrix env: error: unrecognized arguments: --bogus"]),
    (("frobnicate",), ["infermatrix: error: argument COMMAND: invalid choice: 'frobnicate'"]),
    (("run", "--batch-size"), ["infermatrix run: error: argument --batch-size: expected one argument"]),
])
def test_usage_errors_are_one_line_not_the_usage_text(args, parts, capsys):
    """argparse prints its whole usage before the cause (twenty lines for run); the cause alone is wanted."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(parts[0]) and all(part in err for part in parts), err


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero\nmore"), KeyError("labels"),
                                   PermissionError(13, "Permission denied")])
def test_an_unexpected_error_is_exit_3_never_the_failed_check_s_1(monkeypatch, capsys, error):
    """A crash that exits 1 reads as "regressed" to a CI gate; a bug has its own code and its traceback."""
    import bench.commands.env

    def crash(args):
        raise error

    monkeypatch.setattr(bench.commands.env, "main", crash)
    assert main(["env"]) == 3
    err = capsys.readouterr().err
    first = str(error).splitlines()[0]
    assert err.startswith(f"infermatrix: internal error: {type(error).__name__}: {first}\nTraceback (most recent "
                          "call last):\n"), err
    assert "in crash" in err  # the traceback reaches where it was raised


def test_an_interrupt_is_not_an_internal_error(monkeypatch, capsys):
    import bench.commands.env

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.commands.env, "main", interrupted)
    assert main(["env"]) == 130 and capsys.readouterr().err == "infermatrix: interrupted\n"


@pytest.mark.parametrize("args", [["report", "reports/example"], ["report", "reports/example", "--format", "html"],
                                  ["variants"]])
def test_a_reader_that_closed_the_output_is_exit_141_not_an_internal_error(args):
    """``infermatrix report DIR | head``: the reader went away; no traceback, the shell's SIGPIPE status.
    A rich table (``variants``, the run's summary) too: rich's own handler exits 1, a failed check's code."""
    import os
    from pathlib import Path

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_a_line_break_in_an_error_is_written_as_its_escape(tmp_path, capsys):
    """One line per error, even where a path holds a newline."""
    odd = tmp_path / "two\nlines"
    assert main(["report", str(odd)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "two\\nlines" in err, err
    assert main(["merge", str(odd), "--out", str(tmp_path / "m\rx")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "two\\nlines" in err, err


def test_unknown_model_exits_2(tmp_path):
    proc = _cli("run", "--model", "synthetic:llama-999", "--device", "cpu", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "unknown synthetic model" in proc.stderr


def test_variants_lists_builtins():
    proc = _cli("variants", "--json")
    assert proc.returncode == 0
    import json

    listing = json.loads(proc.stdout)
    assert listing["fp32"]["recipe"]["steps"] == []
    assert all(v["applies"] for v in listing.values())


def test_env_prints_environment_record():
    proc = _cli("env", "--no-torch")
    assert proc.returncode == 0
    import json
    import os

    import psutil

    env = json.loads(proc.stdout)
    assert env["cpu_logical_cores"] == os.cpu_count()
    assert env["ram_bytes"] == psutil.virtual_memory().total
    assert env["python"] == sys.version.split()[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git"]["commit"] == (head or None)
    assert env["gpus_source"] == "nvml" or env["gpus_source"].startswith(("no NVIDIA driver", "nvml failed"))
    assert "torch" not in env  # --no-torch


def test_import_bench_and_help_stay_lean():
    code = ("import sys, bench, bench.cli; bench.cli.parser(); "
            "heavy = [m for m in ('onnxruntime', 'bitsandbytes', 'optimum', 'ray', 'torch', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
