"""Bad input refused through the command line a user runs: exactly one stderr line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.matrix import DEFAULT_MATRIX

TIMEOUT = ("must be a finite number of seconds > 0 and at most 2147483 (24 days: the longest wait the "
           "runner's poll takes)")

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, **(env or {})})


def _refused(proc: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2 with ``line`` as the whole of stderr."""
    assert (proc.returncode, proc.stderr) == (2, line + "\n"), (proc.returncode, proc.stderr[-3000:])


def _needs(path: str) -> None:
    if not os.path.isdir(path):
        pytest.skip(f"no {path} on this system")


# --- folders that cannot be written, though os.access says yes to root -----------------------


@pytest.mark.parametrize(("flag", "value", "cause"), [
    ("--cache-dir", "/proc/nope", "--cache-dir /proc/nope cannot be created: /proc is not writable"),
    ("--cache-dir", "/sys", "--cache-dir /sys is not writable"),
    ("--logs-dir", "/sys/nope", "--logs-dir /sys/nope cannot be created: /sys is not writable"),
])
def test_run_refuses_a_pseudo_filesystem_folder_before_anything_is_written(tmp_path, flag, value, cause):
    _needs("/" + value.split("/")[1])
    out = tmp_path / "out"
    proc = _cli("run", "--model", "synthetic:llama-tiny", "--variants", "fp32", "--out", out, flag, value, "--quiet")
    _refused(proc, f"infermatrix run: error: {cause}")
    assert not out.exists()


# --- merge into a place that cannot hold the merged run --------------------------------------


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Two hand-made shard runs of one matrix (no cell runs)."""
    from tests.bench.test_merge import _ok, _shard

    return [_shard(tmp_path, "a", [_ok("v0")], 1), _shard(tmp_path, "b", [_ok("v1")], 2)]


@pytest.mark.parametrize(("out", "folder"), [("/sys/x", "/sys"), ("/proc/x", "/proc")])
def test_merge_into_a_pseudo_filesystem_is_one_line_naming_out(shards, out, folder):
    _needs(folder)
    _refused(_cli("merge", *shards, "--out", out), f"infermatrix merge: error: --out {out}: its folder {folder} "
                                                   "is not writable")
    assert not os.path.lexists(out)


def test_merge_whose_output_fails_after_the_check_is_one_line_naming_out(shards, capsys, monkeypatch):
    """A folder that passed the check but refuses the merged run's temporary sibling (it changed since, or
    the check could not tell): exit 2 naming --out, not a PermissionError traceback.
    """
    import bench.commands  # noqa: F401  imported first: its own name for the check must stay the real one
    from bench.cli import main

    _needs("/sys")
    # merge looks the check up in optimize.atomic when it runs; a module first imported under this patch
    # (bench.commands takes the name at import) would keep the stand-in for every later test in the process
    monkeypatch.setattr("optimize.atomic.folder_problem", lambda folder: None)
    assert main(["merge", *map(str, shards), "--out", "/sys/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infermatrix merge: error: --out /sys/x: cannot write the merged run there (") \
        and err.endswith(")\n") and err.count("\n") == 1, err


# --- run --out: a new or empty directory, never a folder of the user's files ------------------


def test_run_refuses_an_out_folder_holding_other_files_before_the_lock(tmp_path):
    folder = tmp_path / "matrices"
    folder.mkdir()
    (folder / "a.toml").write_text("a")
    (folder / "b.toml").write_text("b")
    proc = _cli("run", "--model", "synthetic:llama-tiny", "--variants", "fp32", "--out", folder, "--quiet")
    _refused(proc, f"infermatrix run: error: --out {folder} exists and is not an empty directory (it holds "
                   "'a.toml' and 1 more); give a new or empty one")
    assert sorted(p.name for p in folder.iterdir()) == ["a.toml", "b.toml"]  # no lock, run.json or logs/


def test_run_into_a_finished_run_keeps_its_own_message(tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    (run_dir / "results.jsonl").write_text("")
    proc = _cli("run", "--model", "synthetic:llama-tiny", "--variants", "fp32", "--out", run_dir, "--quiet")
    _refused(proc, f"infermatrix run: error: --out {run_dir} already holds a run; use --resume {run_dir} or "
                   "another directory")


def test_run_takes_an_existing_empty_out_folder(tmp_path):
    """Accepted: the run goes on to its next check (here a hub id that cannot be fetched offline), and the
    folder, which was there before, stays, empty again.
    """
    folder = tmp_path / "empty"
    folder.mkdir()
    proc = _cli("run", "--model", "nosuch-org-zz/nosuch-zz", "--variants", "fp32", "--out", folder, "--quiet",
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("infermatrix run: error: model 'nosuch-org-zz/nosuch-zz' "
                                                          "is neither a built-in"), proc.stderr[-3000:]
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_new_runs_own_lock_and_torn_run_json_do_not_make_its_folder_not_empty(tmp_path):
    """What a run killed before its run.json was whole leaves: the same --out is taken again."""
    from bench.orchestrate import check_new_run_dir
    from bench.runlock import LOCK
    from optimize.atomic import tmp_sibling

    (tmp_path / LOCK).write_text("1\n")
    tmp_sibling(tmp_path / "run.json").write_text("{")
    check_new_run_dir(tmp_path)


# --- comma lists: an empty item is refused, never dropped -------------------------------------


@pytest.mark.parametrize(("argv", "line"), [
    (["run", "--variants", "fp32,,"], "infermatrix run: error: argument --variants: --variants has an empty variant "
                                      "name in 'fp32,,' (a comma too many, or a name left out)"),
    (["run", "--model", ",synthetic:llama-tiny", "--variants", "fp32"],
     "infermatrix run: error: argument --model: --model has an empty model name in ',synthetic:llama-tiny' (a comma "
     "too many, or a name left out)"),
    (["build", "--variants", "fp32, ,bf16"], "infermatrix build: error: argument --variants: --variants has an empty "
                                             "variant name in 'fp32, ,bf16' (a comma too many, or a name left out)"),
    (["run", "--variants", "fp32", "--batch-size", "1,,8"],
     "infermatrix run: error: argument --batch-size: --batch-size takes comma-separated integers, got '1,,8'"),
    (["run", "--variants", "fp32,bf16,fp32"], "infermatrix run: error: argument --variants: --variants names "
                                              "variant 'fp32' twice in 'fp32,bf16,fp32'"),
    (["build", "--variants", "bf16, bf16"], "infermatrix build: error: argument --variants: --variants names "
                                            "variant 'bf16' twice in 'bf16, bf16'"),
])
def test_an_empty_item_in_a_comma_list_is_refused_naming_the_flag(tmp_path, argv, line):
    blocker = tmp_path / "afile"  # a cache that is a file: a later refusal, so that a regression runs no cell
    blocker.write_text("x")
    command = argv[0]
    proc = _cli(*argv, "--cache-dir", blocker, *(["--out", tmp_path / "out"] if command == "run" else []))
    _refused(proc, f"{line} (see 'infermatrix {command} --help')")
    assert sorted(tmp_path.iterdir()) == [blocker]


# --- repetition settings: the flag or key, the value and the true range -----------------------


@pytest.mark.parametrize(("flags", "cause"), [
    (["--min-reps", "0"], "--min-reps must be a whole number >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be a whole number >= 0, got -1"),
    (["--max-reps", "2"], "--max-reps must be >= min_reps (5), got 2"),  # the default matrix's min_reps
    (["--min-reps", "3", "--max-reps", "2"], "--min-reps must be <= --max-reps (2), got 3"),
    (["--warmup", "99999999999999999999"], "--warmup must be at most 2147483647, got 99999999999999999999"),
    (["--timeout-s", "3000000"], f"timeout_s {TIMEOUT}, got 3000000.0"),
    (["--prompt-tokens", "9" * 22], f"{DEFAULT_MATRIX} (with the command-line flags) scenarios[0]: scenario "
                                    f"prompt_tokens must be at most 2147483647 (a 32-bit count), got {'9' * 22}"),
])
def test_repetition_flags_out_of_range_name_the_flag_and_value(tmp_path, flags, cause):
    proc = _cli("run", "--model", "synthetic:llama-tiny", "--variants", "fp32", "--out", tmp_path / "out", *flags)
    _refused(proc, f"infermatrix run: error: {cause}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("line", "cause"), [
    ("min_reps = 0", "'min_reps' must be a whole number >= 1, got 0"),
    ("min_reps = -1", "'min_reps' must be a whole number >= 1, got -1"),
    ("warmup = -1", "'warmup' must be a whole number >= 0, got -1"),
    ("max_reps = 2", "'min_reps' must be <= 'max_reps' (2), got 5"),
    ("timeout_s = 0", f"'timeout_s' {TIMEOUT}, got 0"),
    ("timeout_s = -1", f"'timeout_s' {TIMEOUT}, got -1"),
    # past what the runner can wait on, or run.json can hold: refused before anything is written
    ("timeout_s = 3e6", f"'timeout_s' {TIMEOUT}, got 3000000.0"),
    ("max_reps = 3000000000", "'max_reps' must be at most 2147483647, got 3000000000"),
    ("seed = 99999999999999999", "'seed' must be at most 2147483647, got 99999999999999999"),
])
def test_repetition_keys_out_of_range_name_the_key_value_and_range(tmp_path, line, cause):
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'models = ["synthetic:llama-tiny"]\nvariants = ["fp32"]\n[measure]\n{line}\n')
    _refused(_cli("run", matrix, "--out", tmp_path / "out"), f"infermatrix run: error: {matrix} [measure]: {cause}")
    assert not (tmp_path / "out").exists()


# --- hub ids without an org (gpt2) --------------------------------------------------------------


def _offline(tmp_path: Path) -> dict:
    """No network and an empty hub cache: a hub id gets as far as its fetch, which fails."""
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf-home")}


@pytest.mark.parametrize("command", ["run", "build"])
def test_a_root_level_hub_id_is_taken_as_a_hub_id_and_fetched(tmp_path, command):
    out = ["--out", tmp_path / "out"] if command == "run" else ["--cache-dir", tmp_path / "out"]
    proc = _cli(command, "--model", "gpt2", "--variants", "fp32", *out, env=_offline(tmp_path))
    fetching, error = proc.stderr.splitlines()
    assert proc.returncode == 2 and fetching == "fetching hub model gpt2", proc.stderr[-3000:]
    assert error.startswith(f"infermatrix {command}: error: model 'gpt2' is neither a built-in, a synthetic, a "
                            "local directory nor a reachable hub id (") and error.endswith(")"), error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("spec", "cause"), [
    *[(spec, f"model {spec!r} is not builtin:NAME, synthetic:NAME, a local directory or a hub id like gpt2 or "
             "org/name") for spec in ("a//b", "a b", "org/name/extra", "org/na--me", "gpt2.git")],
    ("./nope", "model directory './nope' does not exist or has no config.json"),
])
def test_a_spec_that_cannot_be_a_hub_id_is_refused_without_a_fetch(tmp_path, spec, cause):
    proc = _cli("run", "--model", spec, "--variants", "fp32", "--out", tmp_path / "out", env=_offline(tmp_path))
    _refused(proc, f"infermatrix run: error: {ROOT / 'bench' / 'matrices' / 'default.toml'} (with the command-line "
                   f"flags): 'models' {cause}")
    assert not (tmp_path / "out").exists()


# --- report --help says the png files' true names ------------------------------------------------


def test_report_help_names_the_png_files_report_writes(tmp_path):
    from tests.bench.records import record, write_run

    help_text = _cli("report", "--help", env={"COLUMNS": "1000"}).stdout  # one line per option: no wrapping
    assert ("png: decode tokens/s against drift, a figure per scenario group that has both: speed-vs-drift.png for "
            "a run of one group, else speed-vs-drift-MODEL-DEVICE-SCENARIO-bBATCH-pPROMPT-nNEW.png") in help_text
    assert "report.json and the png figures into this directory" in help_text

    def pngs(run, out):
        assert _cli("report", run, "--format", "png", "--out", out).returncode == 0
        return sorted(p.name for p in out.iterdir())

    b8 = {"name": "generate", "batch_size": 8, "prompt_tokens": 128, "new_tokens": 32}
    one = write_run(tmp_path / "one", [record("fp32", model="org/tiny"), record("int8", model="org/tiny")])
    two = write_run(tmp_path / "two", [record("fp32", model="org/tiny"), record("int8", model="org/tiny"),
                                       record("fp32", model="org/tiny", scenario=b8),
                                       record("int8", model="org/tiny", scenario=b8)])
    assert pngs(one, tmp_path / "out1") == ["speed-vs-drift.png"]
    assert pngs(two, tmp_path / "out2") == ["speed-vs-drift-org-tiny-cpu-generate-b1-p128-n32.png",
                                            "speed-vs-drift-org-tiny-cpu-generate-b8-p128-n32.png"]


def test_a_dash_is_standard_output_where_text_is_written_and_refused_where_a_file_is(tmp_path):
    """``--out -`` prints (report, export), as ``compare --json -`` does; a setting that writes a file refuses it."""
    from tests.bench.records import record, write_run

    run = write_run(tmp_path / "run", [record("fp32", model="org/tiny"), record("int8", model="org/tiny")])
    report = _cli("report", run, "--out", "-", cwd=tmp_path)
    assert report.returncode == 0 and report.stdout == _cli("report", run, cwd=tmp_path).stdout
    assert report.stdout.startswith("# infermatrix run")
    export = _cli("export", run, "--to", "pytest-benchmark", "--out", "-", cwd=tmp_path)
    assert export.returncode == 0 and '"benchmarks"' in export.stdout
    assert not (tmp_path / "-").exists()  # no file named "-"
    _refused(_cli("report", run, "--format", "md,csv", "--out", "-", cwd=tmp_path),
             "infermatrix report: error: --out -: several formats (or png) are written as files into a folder; "
             "give a folder, or one text format to print it")
    _refused(_cli("history", "add", run, "--db", "-", cwd=tmp_path),
             "infermatrix history: error: --db -: this setting writes a file, not standard output; give a path")
    assert not (tmp_path / "-").exists()
