"""Bad input to ``run`` and ``ab`` through the command line: one stderr line, exit 2, nothing written.

Each case was found by an audit ending in a traceback, a run of failing cells or a file left
behind (README, "Failure modes": a refused run writes nothing). Every check here happens
before a cell starts, so no test measures anything.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main as cli
from bench.runlock import LOCK, RunLock
from optimize.errors import InputError
from tests.bench.gitrepo import git as _git
from tests.bench.test_failure_modes import SMALL

ROOT = Path(__file__).resolve().parents[2]
TINY = SMALL.replace("{measure}\n", "")  # the failure modes' one-cell matrix


def _tiny(tmp_path: Path, extra: str = "", name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(extra=extra))
    return path


def _refused(rc: int, err: str, *needles: str) -> str:
    """The one stderr line of a refusal (exit 2), which must contain every needle."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = cli(["run", *map(str, args)])
    return rc, capsys.readouterr().err


# --- matrix files that cannot be read --------------------------------------------------------


def test_matrix_file_that_is_not_utf8_names_the_byte_and_its_offset(tmp_path, capsys):
    path = tmp_path / "nonutf8.toml"
    path.write_bytes(b'models = ["synthetic:llama-tiny"]\nname = "caf\xe9"\n')
    rc, err = _run(capsys, path, "--out", tmp_path / "out")
    _refused(rc, err, str(path), "is not UTF-8 text: byte 0xe9 at offset 45 (invalid continuation byte)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 5000 + "}" * 5000])
def test_deeply_nested_matrix_is_one_line_not_a_recursion_error(tmp_path, capsys, value):
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {value}\n")
    rc, err = _run(capsys, path, "--out", tmp_path / "out")
    _refused(rc, err, str(path), "nested too deeply")
    assert not (tmp_path / "out").exists()


def test_unreadable_matrix_file_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    path = _tiny(tmp_path)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: emulate the refusal a user meets, at the read itself
        read_bytes = Path.read_bytes

        def refuse(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    rc, err = _run(capsys, path, "--out", tmp_path / "out")
    _refused(rc, err, str(path), "cannot be read: Permission denied")
    assert not (tmp_path / "out").exists()


def test_matrix_path_that_is_a_directory_says_it_is_a_directory(tmp_path, capsys):
    rc, err = _run(capsys, tmp_path, "--out", tmp_path / "out")
    _refused(rc, err, str(tmp_path), "is a directory")
    assert not (tmp_path / "out").exists()


# --- the matrix key `tokenizer`, checked as --tokenizer is --------------------------------------


@pytest.mark.parametrize("where", ["/nonexistent", "empty-dir"])
def test_matrix_tokenizer_without_a_tokenizer_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    path = _tiny(tmp_path, f'tokenizer = "{where}"')
    rc, err = _run(capsys, path, "--out", tmp_path / "out")
    _refused(rc, err, str(path), "'tokenizer'", repr(where), "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_matrix_tokenizer_that_holds_a_tokenizer_is_accepted(tmp_path):
    from bench.matrix import load_matrix

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert load_matrix(_tiny(tmp_path, f'tokenizer = "{tmp_path / "tok"}"')).tokenizer == str(tmp_path / "tok")


# --- the matrix key `eval_text`: a relative path is the working directory's, as a model's is ---------


def test_relative_eval_text_missing_here_names_the_path_tried_and_the_one_beside_the_matrix(tmp_path, capsys,
                                                                                            monkeypatch):
    """Seen: 'bad.txt' beside the matrix file was refused with "'bad.txt' is not a file" alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "bad.txt").write_text("def f():\n    return 1\n")
    _tiny(tmp_path / "cfg", 'eval_text = "bad.txt"')
    rc, err = _run(capsys, "cfg/tiny.toml", "--out", "out")
    _refused(rc, err, "infermatrix run: error: cfg/tiny.toml: 'eval_text' must name an existing text file: 'bad.txt' "
                      f"is not a file (a relative path is taken from the working directory: tried "
                      f"{Path.cwd() / 'bad.txt'}); the matrix file's folder has one: give 'cfg/bad.txt' or an "
                      "absolute path")
    _tiny(tmp_path / "cfg", 'eval_text = "nothere.txt"', "nothere.toml")
    rc, err = _run(capsys, "cfg/nothere.toml", "--out", "out")
    line = _refused(rc, err, f"'nothere.txt' is not a file (a relative path is taken from the working directory: "
                             f"tried {Path.cwd() / 'nothere.txt'})")
    assert line.endswith("nothere.txt)")  # no file beside the matrix to point at
    assert not (tmp_path / "out").exists()


def test_relative_eval_text_is_read_from_the_working_directory(tmp_path, monkeypatch):
    from bench.matrix import load_matrix

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "bad.txt").write_text("def f():\n    return 1\n")
    assert load_matrix(_tiny(tmp_path / "cfg", 'eval_text = "cfg/bad.txt"')).eval_text == "cfg/bad.txt"


def test_empty_eval_text_is_refused_not_the_built_in_text(tmp_path, capsys):
    rc, err = _run(capsys, _tiny(tmp_path, 'eval_text = ""'), "--out", tmp_path / "out")
    _refused(rc, err, "'eval_text' must name an existing text file: got an empty path")


def test_eval_text_shorter_than_a_prompt_is_refused_before_anything_is_written(tmp_path, capsys):
    """Seen: every cell failed with 'optimize.errors.InputError: ... fewer than --prompt-tokens 128', a flag
    the user never gave; the run exited as if it had measured.
    """
    (tmp_path / "short.py").write_text("def f():\n    return 1\n")
    matrix = _tiny(tmp_path, f'eval_text = "{tmp_path / "short.py"}"\nprompt_source = "eval-text"')
    rc, err = _run(capsys, matrix, "--out", tmp_path / "out")
    _refused(rc, err, f"eval_text '{tmp_path / 'short.py'}' is 7 tokens long with synthetic:llama-tiny's tokenizer; "
                      "a prompt of 16 tokens (the matrix's longest prompt_tokens) needs at least 17: give a longer "
                      'text, shorter prompts or prompt_source = "random"')
    assert not (tmp_path / "out").exists()


def test_eval_text_is_checked_for_what_the_matrix_reads_from_it():
    from bench.commands.run import _check_eval_text_length
    from bench.matrix import parse_matrix

    text = str(ROOT / "optimize" / "errors.py")  # a few hundred tokens
    base = {"models": ["synthetic:llama-tiny"], "eval_text": text,
            "scenarios": [{"name": "generate", "prompt_tokens": [16, 4096], "new_tokens": 4}]}
    with pytest.raises(InputError, match="a prompt of 4096 tokens"):  # the longest prompt of the grid
        _check_eval_text_length(parse_matrix({**base, "drift": {"enabled": False}}, "m.toml"), {}, None)
    # random prompts read no text; drift still reads its windows
    _check_eval_text_length(parse_matrix({**base, "prompt_source": "random", "drift": {"enabled": False}}, "m.toml"),
                            {}, None)
    with pytest.raises(InputError, match=r"a drift window of 8192 tokens \(\[drift\] context\) needs at least "
                                         r"8192: give a longer text or a shorter \[drift\] setting"):
        _check_eval_text_length(parse_matrix({**base, "prompt_source": "random",
                                              "drift": {"context": 8192, "max_tokens": 8192}}, "m.toml"), {}, None)


# --- cache and logs directories ---------------------------------------------------------------


def test_cache_dir_flag_naming_a_file_exits_2_before_any_cell(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, err = _run(capsys, _tiny(tmp_path), "--out", tmp_path / "out", "--cache-dir", blocker, "--quiet")
    _refused(rc, err, "--cache-dir", str(blocker), "is not a directory")
    assert not (tmp_path / "out").exists() and blocker.read_text() == "x"


def test_cache_dir_under_a_file_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, err = _run(capsys, _tiny(tmp_path), "--out", tmp_path / "out", "--cache-dir", blocker / "sub")
    _refused(rc, err, "--cache-dir", "cannot be created", str(blocker), "is not a directory")
    assert not (tmp_path / "out").exists()


def test_cache_env_naming_a_file_exits_2_instead_of_crashing_the_fork_server(tmp_path):
    """Seen: the fork server's child died on FileExistsError and the parent printed 47 lines."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(_tiny(tmp_path)), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "INFERMATRIX_CACHE": str(blocker)})
    _refused(proc.returncode, proc.stderr, "INFERMATRIX_CACHE", str(blocker), "is not a directory")
    assert not (tmp_path / "out").exists() and blocker.read_text() == "x"


@pytest.mark.parametrize("setting", ["--cache-dir", "INFERMATRIX_CACHE"])
def test_unwritable_cache_dir_exits_2_naming_the_setting(tmp_path, capsys, monkeypatch, setting):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes there anyway: emulate the refusal a user meets, at the access check
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != cache and access(p, mode, **kw))
    flag = ["--cache-dir", cache] if setting == "--cache-dir" else []
    if setting == "INFERMATRIX_CACHE":
        monkeypatch.setenv("INFERMATRIX_CACHE", str(cache))
    rc, err = _run(capsys, _tiny(tmp_path), "--out", tmp_path / "out", *flag)
    _refused(rc, err, setting, str(cache), "is not writable")
    assert not (tmp_path / "out").exists() and not list(cache.iterdir())


def test_logs_dir_naming_a_file_exits_2_before_run_json_is_written(tmp_path, capsys):
    """Seen: FileExistsError after run.json was written, and the directory then refused new runs."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, err = _run(capsys, _tiny(tmp_path), "--out", tmp_path / "out", "--logs-dir", blocker)
    _refused(rc, err, "--logs-dir", str(blocker), "is not a directory")
    assert not (tmp_path / "out").exists()


def test_ray_address_without_the_ray_launcher_exits_2_before_run_json_is_written(tmp_path, capsys):
    rc, err = _run(capsys, _tiny(tmp_path), "--out", tmp_path / "out", "--ray-address", "host:1")
    _refused(rc, err, "--ray-address needs --launcher ray")
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, then released: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_ray_address_nothing_answers_at_exits_2_before_anything_is_written(tmp_path, capsys, monkeypatch, where):
    """Seen: ``--ray-address`` of an unreachable cluster wrote run.json and the lock, then Ray retried its
    connection forever (a warning every 35 s), and Ctrl-C did not end the command."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    address = f"127.0.0.1:{_closed_port()}"
    args = ["--out", tmp_path / "out", "--launcher", "ray"]
    if where == "flag":
        args += ["--ray-address", address]
    else:  # Ray's own variable, which ray.init reads where no address is given
        monkeypatch.setenv("RAY_ADDRESS", address)
    rc, err = _run(capsys, _tiny(tmp_path), *args)
    label = "--ray-address" if where == "flag" else "RAY_ADDRESS"
    _refused(rc, err, f"{label} {address}: no Ray cluster there (Connection refused)")
    assert not (tmp_path / "out").exists()


def test_a_port_that_listens_but_is_no_ray_cluster_is_refused_after_the_connect_timeout():
    """A listening port that is not Ray's GCS (the dashboard's, a typo) holds ``ray.init`` forever: the
    connection is tried in a child process, which is killed at the timeout."""
    import socket

    import psutil

    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    from bench.launchers.ray import check_address

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # accepts the connection, never answers Ray's protocol
        address = f"127.0.0.1:{server.getsockname()[1]}"
        before = set(psutil.Process().children(recursive=True))
        with pytest.raises(InputError, match=rf"--ray-address {address}: no Ray cluster answered within 3 s"):
            check_address(address, timeout_s=3)
    assert set(psutil.Process().children(recursive=True)) <= before  # the probe is gone, not orphaned


# --- empty values: refused, never taken as the flag left out -----------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    # Seen: both ran (the default matrix's 10 variants; builtin:pycode) and exited 0.
    (["run", "--variants", "", "--out", "X"], "argument --variants: --variants names no variant, got ''"),
    (["run", "--variants", "fp32", "--model", "", "--out", "Y"], "argument --model: --model names no model, got ''"),
    (["run", "--model", " , ", "--out", "X"], "--model names no model, got ' , '"),
    (["run", "", "--out", "X"], "argument matrix: MATRIX must not be empty, got ''"),  # was the default matrix
    (["run", "--out", ""], "argument --out: --out must not be empty"),  # was the working directory
    (["run", "--resume", ""], "argument --resume: --resume must not be empty"),
    (["run", "--tokenizer", "", "--out", "X"], "argument --tokenizer: --tokenizer must not be empty"),
    (["run", "--cache-dir", "", "--out", "X"], "argument --cache-dir: --cache-dir must not be empty"),
    (["run", "--logs-dir", "", "--out", "X"], "argument --logs-dir: --logs-dir must not be empty"),
    (["run", "--launcher", "ray", "--ray-address", "", "--out", "X"], "argument --ray-address: --ray-address must"),
    (["build", "--variants", ""], "argument --variants: --variants names no variant, got ''"),
    (["build", "--variants", "fp32", "--model", ""], "argument --model: --model must not be empty"),
    (["build", "--variants", "fp32", "--cache-dir", ""], "argument --cache-dir: --cache-dir must not be empty"),
    (["ab", "", "HEAD"], "argument BASE_REV: BASE_REV must not be empty"),
    (["ab", "HEAD~1", ""], "argument HEAD_REV: HEAD_REV must not be empty"),
    (["ab", "HEAD~1", "HEAD", ""], "argument MATRIX: MATRIX must not be empty"),  # was the default matrix
    (["ab", "HEAD~1", "--out", ""], "argument --out: --out must not be empty"),
    (["ab", "HEAD~1", "--cache-dir", ""], "argument --cache-dir: --cache-dir must not be empty"),
    (["ab", "HEAD~1", "--repo", ""], "argument --repo: --repo must not be empty"),
    # the commands that read runs: an empty RUN was the working directory
    (["report", ""], "argument run: RUN must not be empty"),
    (["report", "r", "--out", ""], "argument --out: --out must not be empty"),
    (["select", ""], "argument run: RUN must not be empty"),
    (["export", "", "--to", "pytest-benchmark"], "argument run: RUN must not be empty"),
    (["compare", "", "b"], "argument base: BASE must not be empty"),
    (["compare", "a", ""], "argument head: HEAD must not be empty"),
    (["compare", "a", "b", "--json", ""], "argument --json: --json must not be empty"),
    (["compare", "a", "b", "--markdown", ""], "argument --markdown: --markdown must not be empty"),
    (["merge", "a", "", "--out", "m"], "argument runs: RUN must not be empty"),
    (["merge", "a", "--out", ""], "argument --out: --out must not be empty"),
    (["history", "add", ""], "argument run: RUN must not be empty"),
    (["history", "show", "--db", ""], "argument --db: --db must not be empty"),
    (["history", "show", "--plot", ""], "argument --plot: --plot must not be empty"),
    (["train-reference", "--out", ""], "argument --out: --out must not be empty"),
])
def test_an_empty_value_is_refused_not_taken_as_the_flag_left_out(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    _refused(exc.value.code, capsys.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["run", "--out", "-"], ["run", "--resume", "-"], ["run", "--logs-dir", "-"],
                                  ["run", "--cache-dir", "-"], ["build", "--variants", "fp32", "--cache-dir", "-"],
                                  ["ab", "HEAD~1", "--out", "-"], ["merge", "a", "--out", "-"],
                                  ["train-reference", "--out", "-"]])
def test_a_folder_setting_refuses_the_dash_that_means_standard_output(tmp_path, capsys, monkeypatch, argv):
    """Seen: ``run --out -`` ran the whole default matrix into a folder named "-" and exited 0."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    flag = argv[argv.index("-") - 1]
    _refused(exc.value.code, capsys.readouterr().err,
             f"argument {flag}: {flag} is a folder, and '-' means standard output, which a folder cannot be")
    assert list(tmp_path.iterdir()) == []


# --- --resume keeps the settings the run was started with ---------------------------------------


def _resumable(tmp_path: Path) -> Path:
    """A directory --resume takes up to its run.json, which has no matrix: refused there, after the flags."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    return run_dir


def test_resume_refuses_every_matrix_shaping_flag_given_naming_them(tmp_path, capsys):
    """Seen: --out, --variants, --model, --timeout-s and --no-drift were silently ignored by --resume."""
    run_dir = _resumable(tmp_path)
    rc, err = _run(capsys, "--resume", run_dir, "--out", tmp_path / "other", "--variants", "fp32", "--model",
                   "builtin:pycode", "--timeout-s", "5", "--no-drift", "--threads", "0", "--quiet")
    _refused(rc, err, f"infermatrix run: error: --resume {run_dir} keeps the settings the run was started with; it "
                      "cannot take --out, --model, --variants, --timeout-s, --threads, --no-drift (start a new run "
                      "with --out to change them)")
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"] and not (tmp_path / "other").exists()


RESUME_REFUSED_ARGV = {  # one use of each flag RESUME_REFUSES names
    "out": ["--out", "X"], "model": ["--model", "builtin:pycode"], "variants": ["--variants", "fp32"],
    "batch_size": ["--batch-size", "1"], "prompt_tokens": ["--prompt-tokens", "16"],
    "new_tokens": ["--new-tokens", "4"], "device": ["--device", "cpu"], "warmup": ["--warmup", "0"],
    "min_reps": ["--min-reps", "1"], "max_reps": ["--max-reps", "1"], "budget_s": ["--budget-s", "0"],
    "timeout_s": ["--timeout-s", "5"], "threads": ["--threads", "0"], "no_drift": ["--no-drift"],
    "drift_protocol": ["--drift-protocol", "llama.cpp"], "trust_remote_code": ["--trust-remote-code"],
    "tokenizer": ["--tokenizer", "tok"], "prompt_source": ["--prompt-source", "random"],
}


@pytest.mark.parametrize("dest", sorted(RESUME_REFUSED_ARGV))
def test_resume_refuses_each_matrix_shaping_flag(tmp_path, capsys, dest):
    rc, err = _run(capsys, "--resume", _resumable(tmp_path), *RESUME_REFUSED_ARGV[dest])
    _refused(rc, err, f"it cannot take {RESUME_REFUSED_ARGV[dest][0]} (start a new run")


def test_resume_takes_the_flags_that_say_how_and_where_this_invocation_works(tmp_path, capsys):
    run_dir = _resumable(tmp_path)
    rc, err = _run(capsys, "--resume", run_dir, "--shard", "1/1", "--launcher", "local", "--cache-dir",
                   tmp_path / "cache", "--logs-dir", tmp_path / "logs", "--quiet", "--no-report")
    line = _refused(rc, err, "run.json")  # refused for the run.json without a matrix, past the flags
    assert "cannot take" not in line


def test_every_run_flag_is_either_refused_or_taken_by_resume():
    from bench.cli import parser
    from bench.commands.run import RESUME_APPLIES, RESUME_REFUSES

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    dests = {a.dest for a in sub._actions} - {"help", "matrix", "resume"}
    assert not set(RESUME_REFUSES) & set(RESUME_APPLIES)
    assert dests == set(RESUME_REFUSES) | set(RESUME_APPLIES) and set(RESUME_REFUSES) == set(RESUME_REFUSED_ARGV)


# --- the run directory and its lock -----------------------------------------------------------


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_refusing_a_finished_run_directory_writes_no_lock_file_into_it(tmp_path, capsys):
    finished = tmp_path / "finished"  # as merge leaves one: a run without a lock file
    finished.mkdir()
    (finished / "run.json").write_text('{"matrix": {}}')
    (finished / "results.jsonl").write_text("")
    before = _listing(finished)
    rc, err = _run(capsys, _tiny(tmp_path), "--out", finished)
    _refused(rc, err, str(finished), "already holds a run")
    assert _listing(finished) == before and not (finished / LOCK).exists()


def test_resume_refused_removes_the_lock_file_it_created(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")  # no matrix: refused once the lock is held
    rc, err = _run(capsys, "--resume", run_dir)
    _refused(rc, err, "run.json")
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_discard_removes_the_lock_file_and_the_directories_the_lock_made(tmp_path):
    lock = RunLock(tmp_path / "a" / "b" / "run").acquire()
    assert (tmp_path / "a" / "b" / "run" / LOCK).exists()
    lock.discard()
    assert list(tmp_path.iterdir()) == []


def test_discard_keeps_a_lock_file_that_was_there_before(tmp_path):
    with RunLock(tmp_path):  # an earlier run's lock file, kept after it ended
        pass
    lock = RunLock(tmp_path).acquire()
    lock.discard()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK]


def test_a_racer_that_opened_a_discarded_lock_file_locks_the_new_one(tmp_path, monkeypatch):
    """The race the lock guards: a run refused under the lock removes its file while another waits on it."""
    run_dir = tmp_path / "run"
    first = RunLock(run_dir).acquire()
    racer = RunLock(run_dir)
    stale = os.open(first.path, os.O_RDWR)  # opened before the refused run removes the file
    opened = [stale]
    real_open = racer._open
    monkeypatch.setattr(racer, "_open", lambda: opened.pop() if opened else real_open())
    first.discard()
    racer.acquire()
    try:
        assert racer.path.read_text().strip() == str(os.getpid())
        assert os.fstat(racer._fd).st_ino == racer.path.stat().st_ino  # it holds the file at the path
        with pytest.raises(InputError, match="in use by another infermatrix run"):
            RunLock(run_dir).acquire()
    finally:
        racer.release()


# --- ab: the matrix path and the temporary worktrees ------------------------------------------


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository whose first commit holds a broken bench.toml (an unknown key) and second a valid one."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "bench.toml").write_text(TINY.format(extra="stpes = 1"))
    _git(repo, "add", "bench.toml")
    _git(repo, "commit", "-qm", "broken matrix")
    (repo / "bench.toml").write_text(TINY.format(extra=""))
    _git(repo, "commit", "-qam", "valid matrix")
    return repo


def _no_worktrees_left(repo: Path) -> None:
    assert len(_git(repo, "worktree", "list").splitlines()) == 1
    assert not list((repo / ".git" / "worktrees").glob("*"))


def test_ab_relative_matrix_outside_the_repository_exits_2(repo, tmp_path, capsys, monkeypatch):
    _tiny(tmp_path, name="outside.toml")
    monkeypatch.chdir(repo)
    for matrix in ("../outside.toml", "../nosuch.toml"):
        rc = cli(["ab", "HEAD~1", "HEAD", matrix, "--out", str(tmp_path / "out")])
        _refused(rc, capsys.readouterr().err, f"MATRIX {matrix} is outside the repository")
    assert not (tmp_path / "out").exists()
    _no_worktrees_left(repo)


@pytest.mark.parametrize(("matrix", "needle"), [
    ("nosuch.toml", "'nosuch.toml' does not exist at HEAD~1 ("),  # the base's revision, named
    ("bench.toml", "'stpes' is not a matrix key"),  # refused in the base's worktree, after it was added
])
def test_failed_ab_leaves_no_worktree_in_the_repository(repo, tmp_path, capsys, matrix, needle):
    rc = cli(["ab", "HEAD~1", "HEAD", matrix, "--repo", str(repo), "--out", str(tmp_path / "out")])
    _refused(rc, capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()
    _no_worktrees_left(repo)


def test_build_refuses_an_unusable_cache_and_an_unreachable_hub_id(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = ((["--variants", "fp32", "--cache-dir", str(blocker)], f"--cache-dir {blocker} is not a directory"),
             (["--model", "nonexistent-org-zz/nonexistent-zz", "--variants", "fp32", "--cache-dir", str(tmp_path)],
              "model 'nonexistent-org-zz/nonexistent-zz' is neither a built-in"))
    for argv, needle in cases:
        rc = cli(["build", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and needle in err[-1], (argv, err)
        assert not [p for p in tmp_path.iterdir() if p != blocker]  # nothing built, nothing stored


def test_exclude_rules_that_remove_every_cell_or_can_match_none_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _run(capsys, _tiny(tmp_path, '[[exclude]]\nvariant = "fp32"\n'), "--out", out)
    _refused(rc, err, "the [[exclude]] rules remove every cell; nothing to run")
    assert not out.exists()
    rc, err = _run(capsys, _tiny(tmp_path, '[[exclude]]\nbatch_size = "1"\n', "typed.toml"), "--out", out)
    _refused(rc, err, "exclude[0]", "'batch_size'", "must be an integer, got '1': it would match no cell")
    rc, err = _run(capsys, _tiny(tmp_path, '[[exclude]]\nvariant = 5\n', "typed2.toml"), "--out", out)
    _refused(rc, err, "'variant'", "must be a string, got 5")
    assert not out.exists()


def test_ab_refuses_cells_in_only_one_revision_before_anything_is_built_or_written(repo, tmp_path, capsys):
    (repo / "bench.toml").write_text(TINY.format(extra="").replace('variants = ["fp32"]', 'variants = ["bf16"]'))
    _git(repo, "commit", "-qam", "another variant")
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(out), "--cache-dir", str(cache)])
    started, refusal = capsys.readouterr().err.strip().splitlines()  # what ab compares, then why it will not
    assert started.startswith("ab: base HEAD~1 (") and rc == 2
    _refused(rc, refusal, "2 cells are in only one revision's matrix (use --allow-unmatched",
             "fp32 cpu generate 1/16/4 (only in base)", "bf16 cpu generate 1/16/4 (only in head)")
    assert not out.exists() and not list(cache.glob("variants/*"))  # no run begun, no variant built
    _no_worktrees_left(repo)


def test_ab_refuses_an_output_it_could_not_write_before_any_work(repo, tmp_path, capsys):
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    rc = cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(tmp_path / "ab"),
              "--json", str(a_dir)])
    _refused(rc, capsys.readouterr().err, f"--json {a_dir} is a directory; give a file")
    assert not (tmp_path / "ab").exists() and _git(repo, "worktree", "list").count("\n") == 1


def test_build_with_a_cache_dir_ignores_an_unusable_default_cache_but_run_does_not(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setenv("INFERMATRIX_CACHE", str(blocker))  # where a fork server would write its preload.log
    rc = cli(["build", "--variants", "fp32", "--cache-dir", str(tmp_path / "store")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["status"] == "ok" and blocker.read_text() == "x"
    rc, err = _run(capsys, _tiny(tmp_path), "--cache-dir", str(tmp_path / "store"), "--out", tmp_path / "run")
    _refused(rc, err, "INFERMATRIX_CACHE", str(blocker), "is not a directory", "whatever --cache-dir says")
    assert not (tmp_path / "run").exists()


# --- more threads than the machine lets the run use -------------------------------------------


def test_more_threads_than_usable_cpus_is_refused_from_the_flag_the_matrix_and_a_resume(tmp_path, capsys,
                                                                                       monkeypatch):
    """Seen: --threads 100000 was accepted, then the ceilings' job and every cell failed on mmap ENOMEM."""
    from bench.commands.run import check_threads
    from bench.matrix import load_matrix
    from bench.orchestrate import start_run

    usable = len(os.sched_getaffinity(0))
    too_many = str(usable + 1)
    needle = f"threads must be at most the {usable} CPUs this process may run on, got {too_many}"
    rc, err = _run(capsys, _tiny(tmp_path), "--threads", too_many, "--out", tmp_path / "out")
    _refused(rc, err, needle)
    path = _tiny(tmp_path, name="threads.toml")
    path.write_text(path.read_text().replace("[drift]", f"threads = {too_many}\n[drift]"))
    rc, err = _run(capsys, path, "--out", tmp_path / "out")
    _refused(rc, err, needle, "[measure] threads")
    assert not (tmp_path / "out").exists()

    matrix = load_matrix(path)  # a run started where these threads fit, resumed where they do not
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    before = sorted(p.name for p in run_dir.iterdir())
    rc, err = _run(capsys, "--resume", run_dir, "--quiet")
    _refused(rc, err, needle)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    check_threads(matrix, "ray")  # a Ray node may have more cores than this host: not judged here
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable + 1)))
    check_threads(matrix, "local")
