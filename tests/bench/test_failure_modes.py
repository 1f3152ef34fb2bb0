"""Every fault and bad input ends cleanly: a one-line error with exit 2, or a record, never a lost one.

Each test is named for the behaviour a hostile or unlucky user meets (see the README's
"Failure modes").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.matrix import load_matrix, narrow, parse_matrix
from bench.orchestrate import Shard, execute, start_run
from bench.results import append_record, read_records, read_run
from optimize.atomic import tmp_sibling
from optimize.errors import InputError

SMALL = """
name = "small"
models = ["synthetic:llama-tiny"]
variants = ["fp32"]
devices = ["cpu"]
{extra}
[[scenarios]]
name = "generate"
batch_size = [1]
prompt_tokens = [16]
new_tokens = [4]

[measure]
warmup = 0
min_reps = 1
max_reps = 1
budget_s = 0
timeout_s = 120
roofline = false
{measure}
[drift]
enabled = false
"""


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _matrix_file(tmp_path: Path, extra: str = "", measure: str = "", name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(SMALL.format(extra=textwrap.dedent(extra), measure=textwrap.dedent(measure)))
    return path


def _one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _record(cell_id: str, status: str = "ok", **extra) -> dict:
    """The least a reader takes as a record; a one-letter ``cell_id`` is repeated to the 16 hex digits of one."""
    return {"schema_version": 1, "cell_id": cell_id if len(cell_id) == 16 else cell_id * 16, "status": status,
            "model": "m", "variant": "fp32", "device": "cpu",
            "scenario": {"name": "generate", "batch_size": 1, "prompt_tokens": 16, "new_tokens": 4},
            "metrics": {}, "samples": {}, **extra}


def _ids(records: list[dict]) -> list[str]:
    return [r["cell_id"][0] for r in records]


# --- 1. security: a string is never a boolean -------------------------------------------


@pytest.mark.parametrize("text", ['"false"', '"no"', "0", "1"])
def test_string_or_number_trust_remote_code_is_an_error_not_true(text):
    with pytest.raises(InputError, match="trust_remote_code.*true or false"):
        parse_matrix({"trust_remote_code": tomllib_value(text)}, "m.toml")


def tomllib_value(text: str):
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


@pytest.mark.parametrize(("table", "key"), [("measure", "roofline"), ("drift", "enabled")])
def test_every_matrix_boolean_rejects_a_string(table, key):
    with pytest.raises(InputError, match=key):
        parse_matrix({table: {key: "false"}}, "m.toml")


def test_string_false_trust_remote_code_in_a_matrix_file_exits_2_before_any_code_runs(tmp_path):
    path = _matrix_file(tmp_path, extra='trust_remote_code = "false"')
    _one_line_exit_2(_cli("run", str(path), "--out", str(tmp_path / "run")), "trust_remote_code", "'false'")
    assert not (tmp_path / "run").exists()


def test_recipe_parameters_reject_booleans_for_numbers_and_strings_for_booleans():
    base = {"name": "mine", "steps": [{"technique": "prune-magnitude"}]}
    for bad in ({"version": True}, {"include_lm_head": "false"}, {"include_lm_head": 1}, {"sparsity": float("nan")},
                {"sparsity": float("inf")}):
        table = {**base, "steps": [{**base["steps"][0], **bad}]}
        with pytest.raises(InputError, match="prune-magnitude"):
            parse_matrix({"recipe": [table], "variants": ["mine"]}, "m.toml")


# --- 2. records: whole-or-nothing appends, torn tails, corrupt lines ---------------------


def test_short_write_raises_and_leaves_results_as_they_were(tmp_path, monkeypatch):
    from bench.results import RecordWriteError

    append_record(tmp_path, _record("a"))
    before = (tmp_path / "results.jsonl").read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # a full disk
    with pytest.raises(RecordWriteError, match="short write"):
        append_record(tmp_path, _record("b", padding="x" * 9000))
    monkeypatch.undo()
    assert (tmp_path / "results.jsonl").read_bytes() == before
    append_record(tmp_path, _record("c"))
    assert _ids(read_records(tmp_path)) == ["a", "c"]


def test_torn_last_line_is_moved_aside_so_the_next_record_is_whole(tmp_path):
    from bench.results import TORN, CorruptRecordWarning, repair_torn_tail

    append_record(tmp_path, _record("a"))
    with (tmp_path / "results.jsonl").open("ab") as fh:
        fh.write(b'{"cell_id": "b", "status": "o')  # killed mid-write
    with pytest.warns(CorruptRecordWarning, match=r"results.jsonl:2: torn last line"):
        append_record(tmp_path, _record("c"))
    lines = (tmp_path / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines) and len(lines) == 2
    assert _ids(read_records(tmp_path)) == ["a", "c"]
    assert (tmp_path / TORN).read_bytes() == b'{"cell_id": "b", "status": "o\n'  # nothing is thrown away
    assert repair_torn_tail(tmp_path) is None


def test_loader_names_corrupt_lines_and_keeps_the_good_ones(tmp_path):
    from bench.results import CorruptRecordWarning

    good = [json.dumps(_record(c)) for c in ("a", "b", "c")]
    (tmp_path / "results.jsonl").write_bytes("\n".join([good[0], "{not json", good[1], "[1, 2]", '{"x": 1}',
                                                        good[2]]).encode() + b"\n\xff\xfe\n")
    with pytest.warns(CorruptRecordWarning) as caught:
        records = read_records(tmp_path)
    assert _ids(records) == ["a", "b", "c"]
    message = str(caught[0].message)
    assert "skipped 4 corrupt line(s)" in message
    for number in ("2 (", "4 (", "5 (", "7 ("):
        assert number in message, message


@pytest.mark.slow
def test_resume_after_a_torn_line_keeps_every_record(tmp_path, cache_dir):
    from bench.results import TORN

    run_dir = tmp_path / "run"
    path = _matrix_file(tmp_path)
    first = _cli("run", str(path), "--out", str(run_dir), "--quiet")
    assert first.returncode == 0, first.stderr
    results = run_dir / "results.jsonl"
    whole = results.read_bytes()
    results.write_bytes(whole[: len(whole) // 2])  # a crash mid-write: the only record is torn
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / f"run.json.tmp{dead.pid}").write_text("{")  # a run.json write killed before its rename
    (run_dir / f"notes.tmp{os.getpid()}").write_text("")  # a live process's: kept
    # Cache writes killed before their rename: a FLOPs count, encoded text, a drift reference, a variant's
    # drift figures.
    host = tmp_sibling(tmp_path).name.split("@")[1]
    stale = [cache_dir / "flops" / f"abc.json.tmp{dead.pid}@{host}",
             cache_dir / "tokens" / f"t.npy.tmp{dead.pid}@{host}", cache_dir / "drift" / f"ref.tmp{dead.pid}@{host}",
             cache_dir / "drift" / "ref0" / "variants" / f"v.json.tmp{dead.pid}@{host}"]
    elsewhere = cache_dir / "drift" / "ref0" / "variants" / f"w.json.tmp{dead.pid}@another-host"  # not ours to judge
    for path in [*stale, elsewhere]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    resumed = _cli("run", "--resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "torn last line" in resumed.stderr
    assert not (run_dir / f"run.json.tmp{dead.pid}").exists() and (run_dir / f"notes.tmp{os.getpid()}").exists()
    assert f"removed 1 temporary entry left by killed processes in {run_dir}" in resumed.stderr
    assert not any(path.exists() for path in stale) and elsewhere.exists()
    for folder in (cache_dir / "flops", cache_dir / "tokens", cache_dir / "drift",
                   cache_dir / "drift" / "ref0" / "variants"):
        assert f"removed 1 temporary entry left by killed processes in {folder}\n" in resumed.stderr
    lines = results.read_bytes().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"  # the re-run cell's record, whole
    assert (run_dir / TORN).exists()


# run.json's last write refused, as by a folder made read-only or immutable mid-run, or a full disk
REFUSE_THE_END = """
import runpy
import bench.orchestrate as orchestrate

real = orchestrate.write_json_atomic


def refused(path, data):
    if data.get("ended"):
        raise PermissionError(1, "Operation not permitted", str(path) + ".tmp")
    real(path, data)


orchestrate.write_json_atomic = refused
runpy.run_module("bench.cli", run_name="__main__", alter_sys=True)
"""


def test_a_run_json_write_refused_at_the_end_is_one_line_exit_1_and_resume_finishes_it(tmp_path, cache_dir):
    """Seen: the run directory made immutable after the last record: exit 3, "internal error" and a
    traceback, for a fault of the disk that no code can fix."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", REFUSE_THE_END, "run", str(_matrix_file(tmp_path)), "--out",
                           str(run_dir), "--quiet", "--no-report"], capture_output=True, text=True, timeout=400,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"infermatrix run: error: could not write {run_dir / 'run.json'} (the run's end; --resume writes it): "
        "Operation not permitted; the records written before it are intact")
    assert "Traceback" not in proc.stderr
    assert [r["status"] for r in read_records(run_dir)] == ["ok"] and json.loads((run_dir / "run.json")
                                                                                 .read_text())["ended"] is None
    resumed = _cli("run", "--resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["ended"] and len(read_records(run_dir)) == 1


def test_a_jobs_settings_that_cannot_be_written_stop_the_run_with_one_line(tmp_path):
    """The logs folder unwritable mid-run: every later job would fail alike, so the run stops, naming it."""
    from bench.results import RunWriteError
    from bench.runner import run_job

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(RunWriteError, match=rf"could not write {re.escape(str(blocker))}/logs/c\.cell\.json "
                                            r"\(the job's settings\): "):
        run_job("cell", {"cell_id": "c"}, blocker / "logs", 60.0)


# --- 4. one run per run directory --------------------------------------------------------


def test_second_run_on_a_locked_directory_exits_2_naming_the_holders_pid(tmp_path, capsys):
    from bench.cli import main as cli
    from bench.results import require_run_dir
    from bench.runlock import RunLock, holder_pid

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from bench.runlock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"in use by another infermatrix run \\(PID {holder.pid}\\)"):
            RunLock(run_dir).acquire()
        proc = _cli("run", str(_matrix_file(tmp_path)), "--out", str(run_dir), "--quiet")
        _one_line_exit_2(proc, f"PID {holder.pid}")
        assert not (run_dir / "run.json").exists()
        # Seen: between a run's lock and its run.json (the ceilings take seconds), a resume, report or select
        # of the directory said "not a run directory".
        assert holder_pid(run_dir) == holder.pid
        starting = f"a run is starting there (infermatrix, PID {holder.pid}) and has not written its run.json yet"
        for argv, said in ((["run", "--resume", str(run_dir)], f"--resume {run_dir}: {starting}"),
                           (["report", str(run_dir)], f"{run_dir}: {starting}"),
                           (["select", str(run_dir)], f"{run_dir}: {starting}")):
            assert cli(argv) == 2
            assert capsys.readouterr().err.endswith(f"error: {said}; wait for it\n"), argv
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):  # the kernel dropped the dead holder's lock
        assert holder_pid(run_dir) == os.getpid()
    assert holder_pid(run_dir) is None
    with pytest.raises(InputError, match=r"run is not a run directory \(no run.json\)$"):
        require_run_dir(run_dir)


@pytest.mark.slow
def test_two_runs_started_together_on_one_directory_record_each_cell_once(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    path = _matrix_file(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(path), "--out", str(run_dir), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=400), p.stderr.read()) for p in procs)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    # normally refused by the lock; "already holds a run" only if the first had finished before the second began
    assert "in use by another infermatrix run" in outcomes[1][1] or "already holds a run" in outcomes[1][1]
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 1


# --- 5. NaN and infinities ----------------------------------------------------------------


@pytest.mark.parametrize("flag", [("--budget-s", "nan"), ("--timeout-s", "nan"), ("--timeout-s", "inf"),
                                  ("--budget-s", "-1"), ("--timeout-s", "0")])
def test_nan_or_infinite_seconds_on_the_command_line_exit_2(flag, tmp_path):
    proc = _cli("run", str(_matrix_file(tmp_path)), *flag, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and flag[0] in proc.stderr and "finite" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line", ["timeout_s = nan", "budget_s = inf", "timeout_s = 0", "seed = 1.5",
                                  "warmup = true", "budget_s = -inf"])
def test_nan_infinite_or_mistyped_measure_settings_are_rejected(line):
    import tomllib

    with pytest.raises(InputError, match=r"\[measure\]"):
        parse_matrix({"measure": tomllib.loads(line)}, "m.toml")


def test_nan_budget_given_to_narrow_is_rejected():
    with pytest.raises(InputError, match=r"^--budget-s must be a finite number of seconds >= 0, got nan$"):
        narrow(load_matrix(), repeat={"budget_s": float("nan")})


# --- 6. ignored or crashing input ---------------------------------------------------------


def test_unknown_recipe_key_is_an_error_with_did_you_mean():
    table = {"name": "mine", "stpes": [{"technique": "prune-magnitude"}]}
    with pytest.raises(InputError, match=r"'stpes' is not a recipe key \(did you mean 'steps'\?\)"):
        parse_matrix({"recipe": [table], "variants": ["mine"]}, "m.toml")


@pytest.mark.parametrize(("rule", "cause"), [
    ({"variant": "bf61"}, "'variant' = 'bf61' names no variant of this matrix, so it would match no cell (did you mean "
                          "'bf16'?); the matrix has: bf16, fp32"),
    ({"model": "builtin:pycod"}, "'model' = 'builtin:pycod' names no model of this matrix, so it would match no cell "
                                 "(did you mean 'builtin:pycode'?); the matrix has: builtin:pycode"),
    ({"device": "gpu"}, "'device' = 'gpu' names no device of this matrix, so it would match no cell (did you mean "
                        "'cpu'?); the matrix has: auto"),
    ({"name": "prefil"}, "'name' = 'prefil' names no scenario kind of this matrix, so it would match no cell (did "
                         "you mean 'prefill'?); the matrix has: decode, prefill"),
])
def test_an_exclude_rule_naming_what_the_matrix_lacks_is_refused(rule, cause):
    """A typo (bf61) matched no cell in silence: the run measured the cells the rule meant to leave out."""
    data = {"variants": ["fp32", "bf16"], "scenarios": [{"name": "prefill"}, {"name": "decode"}], "exclude": [rule]}
    with pytest.raises(InputError) as err:
        parse_matrix(data, "m.toml")
    assert str(err.value) == f"m.toml exclude[0]: {cause}"
    # What a rule may name: any of the matrix's, and cpu or cuda where the matrix says auto.
    for ok in ({"variant": "bf16"}, {"device": "cpu"}, {"device": "cuda"}, {"name": "decode"}):
        assert parse_matrix({**data, "exclude": [ok]}, "m.toml").exclude == (ok,)


def test_unknown_exclude_key_is_an_error_with_did_you_mean():
    with pytest.raises(InputError, match=r"exclude\[0\]: 'varient'.*did you mean 'variant'"):
        parse_matrix({"exclude": [{"varient": "fp32"}]}, "m.toml")


def test_two_recipes_with_one_name_are_an_error():
    steps = [{"technique": "prune-magnitude"}]
    with pytest.raises(InputError, match="'mine' is used by two recipes"):
        parse_matrix({"recipe": [{"name": "mine", "steps": steps}, {"name": "mine", "steps": []}]}, "m.toml")


def test_recipe_named_like_a_builtin_variant_is_an_error():
    with pytest.raises(InputError, match="'fp32' is a built-in variant"):
        parse_matrix({"recipe": [{"name": "fp32", "steps": [{"technique": "prune-magnitude"}]}]}, "m.toml")


@pytest.mark.parametrize(("toml", "needle"), [
    ('scenarios = ["generate"]', "must be a table"),
    ("recipe = 5", "'recipe' must be an array of tables"),
    ("eval_text = 5", "'eval_text' must be a string"),
    ('eval_text = "/no/such/file.txt"', "'eval_text' must name an existing text file"),
    ('description = ["x"]', "'description' must be a string"),
    ('[[recipe]]\nname = "x"\nsteps = [{technique = 5}]', "'technique' key naming a technique"),
])
def test_mistyped_matrix_values_are_one_line_errors_not_tracebacks(tmp_path, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    _one_line_exit_2(_cli("run", str(path), "--out", str(tmp_path / "run")), needle)


def test_out_that_is_a_file_or_cannot_be_created_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = _matrix_file(tmp_path)
    _one_line_exit_2(_cli("run", str(path), "--out", str(blocker)), "is a file")
    _one_line_exit_2(_cli("run", str(path), "--out", str(blocker / "sub")), "cannot be created")


def test_corrupt_run_json_is_one_line_exit_2_for_resume_report_and_merge(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"matrix": {"name": ')
    _one_line_exit_2(_cli("run", "--resume", str(run_dir)), "run.json", "corrupt")
    _one_line_exit_2(_cli("report", str(run_dir)), "run.json", "corrupt")
    _one_line_exit_2(_cli("merge", str(run_dir), "--out", str(tmp_path / "merged")), "run.json", "corrupt")
    assert not (tmp_path / "merged").exists()


def test_missing_eval_text_file_is_an_input_error_not_random_prompts(tiny_ref, tmp_path):
    from bench.prompts import prompt_ids

    with pytest.raises(InputError, match="missing.txt"):
        prompt_ids(tiny_ref, 8192, 1, 16, eval_text=str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="eval_text"):
        parse_matrix({"eval_text": str(tmp_path / "missing.txt")}, "m.toml")


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xc1\x00 not text", "is not UTF-8 text: byte 0xc1 at offset 0 (invalid start byte)"),
    (b"def f():\n    return '\xe9", "is not UTF-8 text: byte 0xe9 at offset 21 (unexpected end of data)"),
    (b"", "holds no text"),
    (b" \n\t\n", "holds no text"),
])
def test_an_evaluation_text_that_is_not_text_exits_2_before_any_cell(tmp_path, content, needle):
    """Seen: a binary eval_text ran the whole matrix, every cell failing with a UnicodeDecodeError."""
    text = tmp_path / "eval.txt"
    text.write_bytes(content)
    path = tmp_path / "m.toml"
    path.write_text(f'eval_text = "{text}"\n')
    _one_line_exit_2(_cli("run", str(path), "--out", str(tmp_path / "run")), "'eval_text'", needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("files", "needle"), [
    ({"config.json": '{"model_type": "llama", "hidden_size": 64'}, "config.json is not valid JSON"),
    ({"config.json": '["llama"]', "model.safetensors": ""}, "config.json has no 'model_type'"),
    ({"config.json": '{"model_type": "llama"}', "tokenizer.json": "{}"}, "holds no weights"),
])
def test_a_model_directory_without_a_config_or_weights_exits_2_before_any_cell(tmp_path, files, needle):
    """Seen: each of these ran the roofline and then failed every cell with a loader traceback."""
    model = tmp_path / "my-model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    line = _one_line_exit_2(_cli("run", "--model", str(model), "--variants", "fp32", "--out", str(tmp_path / "run")),
                            f"model directory {str(model)!r}", needle)
    assert line.startswith("infermatrix run: error: ")
    assert not (tmp_path / "run").exists()


def test_weights_in_shards_or_pytorch_files_are_weights(tmp_path):
    from optimize.models import check_model_spec

    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model-00001-of-00002.bin"):
        model = tmp_path / name.replace(".", "-")
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "gpt2"}')
        (model / name).write_text("")
        check_model_spec(str(model))


def _one_cell(tmp_path: Path, cache_dir: Path, **narrowed) -> dict:
    """The record of the one cell of the small matrix, narrowed (``prompt_tokens=[600]``), run through the runner."""
    from bench.launchers.local import LocalLauncher

    matrix = narrow(load_matrix(_matrix_file(tmp_path)), **narrowed)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=None, launcher="local", environment={})
    [record] = execute(matrix, run_dir, LocalLauncher(run_dir / "logs"), cache_dir=str(cache_dir),
                       resolve_device=lambda d: "cpu")
    return record


def test_prompt_longer_than_the_models_context_is_skipped_with_the_reason(tmp_path, cache_dir):
    # llama-tiny has 512 positions; the evaluation text holds enough tokens for the prompt.
    record = _one_cell(tmp_path, cache_dir, prompt_tokens=[600])
    assert record["status"] == "skipped", record
    assert "exceeds the model's context of 512 positions" in record["error"]


def test_a_batch_beyond_the_memory_available_is_skipped_with_the_figures_not_run(tmp_path, cache_dir):
    record = _one_cell(tmp_path, cache_dir, batch_size=[10**9])  # 128 GB of prompt ids alone
    assert record["status"] == "skipped", record
    assert re.search(r"^batch 1000000000 x prompt 16 \+ 4 new tokens: the prompt, KV cache and logits alone need "
                     r"an estimated [0-9.]+ GiB, more than the [0-9.]+ GiB available on cpu$", record["error"])


# --- 7. consistency: resume, shards, merge, run names ------------------------------------


def _started(tmp_path: Path, shard: Shard | None = None) -> Path:
    matrix = load_matrix(_matrix_file(tmp_path))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(matrix, run_dir, shard=shard, launcher="local", environment={"torch": {"cuda_available": False}})
    return run_dir


def test_resume_refuses_results_that_belong_to_another_matrix(tmp_path):
    run_dir = _started(tmp_path)
    append_record(run_dir, _record("0123456789abcdef"))
    _one_line_exit_2(_cli("run", "--resume", str(run_dir), "--quiet"), "not a cell of run.json's matrix")
    assert len(read_records(run_dir)) == 1


def test_resume_with_a_different_shard_is_refused(tmp_path):
    run_dir = _started(tmp_path, Shard(1, 2))
    _one_line_exit_2(_cli("run", "--resume", str(run_dir), "--shard", "2/2", "--quiet"),
                     "started as shard 1/2")
    assert not (run_dir / "results.jsonl").exists()


def test_resume_refuses_records_of_another_shard(tmp_path):
    from bench.matrix import expand

    run_dir = _started(tmp_path, Shard(2, 2))
    matrix = narrow(load_matrix(_matrix_file(tmp_path)), batch_size=[1, 2])  # two cells: one per shard
    run = read_run(run_dir)
    run["matrix"] = {**matrix.to_dict(), "source": "m.toml"}
    (run_dir / "run.json").write_text(json.dumps(run))
    first = expand(matrix, lambda d: "cpu")[0]  # shard 1's cell
    append_record(run_dir, _record(first.cell_id))
    with pytest.raises(InputError, match="not in shard 2/2"):
        execute(matrix, run_dir, launcher=None, shard=Shard(2, 2), resolve_device=lambda d: "cpu")


def test_failed_merge_leaves_no_partial_output(tmp_path):
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        start_run(load_matrix(_matrix_file(tmp_path)), d, shard=None, launcher="local", environment={})
        append_record(d, _record("1"))
        append_record(d, _record("2"))
        dirs.append(d)
    out = tmp_path / "merged"
    proc = _cli("merge", *map(str, dirs), "--out", str(out))
    _one_line_exit_2(proc, "shards overlap")
    assert not out.exists()
    assert not list(tmp_path.glob("merged.tmp*"))


@pytest.mark.parametrize("name", ["../../evil", "/etc/x", "a/b", "..", ".hidden", "", "x" * 101, "a\\b"])
def test_run_name_cannot_leave_the_runs_folder(name):
    with pytest.raises(InputError, match="'name'"):
        parse_matrix({"name": name}, "m.toml")


def test_default_run_name_from_an_odd_file_name_stays_a_plain_directory_name():
    assert parse_matrix({}, "/tmp/../my matrix (v2).toml").name == "my-matrix--v2-"


def test_run_with_a_traversing_name_writes_nothing_outside(tmp_path):
    path = _matrix_file(tmp_path)
    path.write_text(path.read_text().replace('name = "small"', 'name = "../../../escaped"'))
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    _one_line_exit_2(proc, "'name'")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "reports").exists()


def test_lock_names_its_holder_and_is_released_on_exit(tmp_path):
    from bench.runlock import RunLock

    run_dir = tmp_path / "r"
    with RunLock(run_dir):
        assert (run_dir / ".infermatrix.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(InputError, match=f"PID {os.getpid()}"):
            RunLock(run_dir).acquire()  # a second descriptor, even in this process, is refused
    with RunLock(run_dir):
        pass


# --- 9. the shipped tokenizer feeds generate() directly ----------------------------------


def test_shipped_tokenizer_output_goes_straight_into_generate():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimize.reference import BUILTIN_DIR

    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR).eval()
    inputs = tok("def add(a, b):\n    return", return_tensors="pt")
    assert "token_type_ids" not in inputs
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize(("name", "why"), [
    ("\x1b[31mred\x1b[0m", "holds U+001B (a control character)"), ("a\x00b", "holds U+0000 (a control character)"),
    ("two\nlines", "holds U+000A (a control character)"), ("bell\x07", "holds U+0007 (a control character)"),
    (" padded", "has surrounding spaces"),
    ("int8\u00a0w", "holds U+00A0 (NO-BREAK SPACE), which does not print as it is"),  # pasted from a web page
    ("a\u200bb", "holds U+200B (ZERO WIDTH SPACE)"),
])
def test_a_variant_name_with_control_characters_or_padding_is_refused(name, why):
    with pytest.raises(InputError, match=re.escape(f"variant name {name!r} {why}")):
        parse_matrix({"recipe": [{"name": name, "steps": []}], "variants": [name]}, "m.toml")
    assert parse_matrix({"recipe": [{"name": "int8 (κ=2)", "steps": []}], "variants": ["int8 (κ=2)"]},
                        "m.toml").variants  # any printable text stays a name
