"""``infermatrix train-reference`` refuses bad input in one line with exit 2 and leaves nothing at ``--out``.

No test here trains: bad settings are refused before the corpus is read, a corpus too short
before the model exists, and the output tests replace the training loop.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import optimize.reference.train as train
from bench.cli import main as cli
from optimize.reference.corpus import is_held_out

# Fast settings, so that a check that stopped refusing would fail quickly instead of training for an hour.
TINY = ["--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1",
        "--num-heads", "2", "--num-kv-heads", "1", "--max-position-embeddings", "64", "--seq-len", "32",
        "--eval-context", "32", "--batch-size", "2", "--steps", "1", "--warmup-steps", "0", "--log-every", "1"]
TRAIN_MODULES = ("bisect.py", "heapq.py", "shlex.py", "string.py", "textwrap.py")


def _names(held_out: bool):
    """File names the corpus split puts on the requested side (library files, not tests)."""
    return (f"lib{i}.py" for i in itertools.count() if is_held_out(f"lib{i}.py", 0.05) == held_out)


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> Path:
    """A few real stdlib modules for training and one held out for evaluation (``copy.py``)."""
    root = tmp_path_factory.mktemp("stdlib")
    src = Path(sysconfig.get_paths()["stdlib"])
    for name, module in zip(_names(False), TRAIN_MODULES, strict=False):
        shutil.copy(src / module, root / name)
    shutil.copy(src / "copy.py", root / next(_names(True)))
    return root


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty directory to hold ``--out``; the tests check it is still empty afterwards."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def _refused(capsys, argv: list[str], *named: str) -> str:
    """Run the command, expect exit 2 and one stderr line naming ``named``; return the line."""
    assert cli(["train-reference", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infermatrix train-reference: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    for text in named:
        assert text in err, (text, err)
    return err


@pytest.fixture
def no_corpus(monkeypatch):
    """Reading the corpus fails the test: settings must be refused before it."""

    def read(*_):
        raise AssertionError("the corpus was read before the settings were checked")

    monkeypatch.setattr(train, "build_corpus", read)


BAD_SETTINGS = [
    (["--vocab-size", "0"], "--vocab-size 0: must be an integer >= 258"),
    (["--vocab-size", "100"], "--vocab-size 100: must be an integer >= 258"),
    (["--hidden-size", "-64"], "--hidden-size -64: must be a positive integer"),
    (["--hidden-size", "33"], "--hidden-size 33: must be a multiple of --num-heads (2)"),
    (["--hidden-size", "6", "--num-kv-heads", "2"], "--hidden-size 6: gives an odd head size 3"),
    (["--intermediate-size", "0"], "--intermediate-size 0: must be a positive integer"),
    (["--num-layers", "0"], "--num-layers 0: must be a positive integer"),
    (["--num-heads", "0"], "--num-heads 0: must be a positive integer"),
    (["--num-kv-heads", "0"], "--num-kv-heads 0: must be a positive integer"),
    (["--num-kv-heads", "3"], "--num-kv-heads 3: must divide --num-heads (2)"),
    (["--max-position-embeddings", "0"], "--max-position-embeddings 0: must be a positive integer"),
    (["--seq-len", "0"], "--seq-len 0: must be an integer >= 2"),
    (["--seq-len", "1"], "--seq-len 1: must be an integer >= 2"),
    (["--seq-len", "65"], "--seq-len 65: must be at most --max-position-embeddings (64)"),
    (["--eval-context", "0"], "--eval-context 0: must be an integer >= 2"),
    (["--eval-context", "100"], "--eval-context 100: must be at most --max-position-embeddings (64)"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["--steps", "-1"], "--steps -1: must be a positive integer"),
    (["--log-every", "0"], "--log-every 0: must be a positive integer"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be an integer >= 0"),
    (["--threads", "-1"], "--threads -1: must be an integer >= 0 (0: torch's default)"),
    (["--threads", "100000"], "CPUs this process may run on, got 100000 (--threads; 0 leaves it to torch)"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 2**63)"),
    (["--lr", "nan"], "--lr nan: must be a finite positive number"),
    (["--lr", "inf"], "--lr inf: must be a finite positive number"),
    (["--lr", "-1"], "--lr -1.0: must be a finite positive number"),
    (["--lr", "0"], "--lr 0.0: must be a finite positive number"),
    (["--min-lr-fraction", "inf"], "--min-lr-fraction inf: must be in [0, 1]"),
    (["--min-lr-fraction", "nan"], "--min-lr-fraction nan: must be in [0, 1]"),
    (["--min-lr-fraction", "-0.1"], "--min-lr-fraction -0.1: must be in [0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number >= 0"),
    (["--grad-clip", "0"], "--grad-clip 0.0: must be a positive number"),
    (["--grad-clip", "nan"], "--grad-clip nan: must be a positive number"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_before_the_corpus_is_read(flags, message, stdlib, work, capsys, no_corpus):
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(stdlib), *TINY, *flags], message)
    assert list(work.iterdir()) == []


def test_a_non_integer_count_is_a_usage_error(work, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["train-reference", "--out", str(work / "model"), "--steps", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err and "1.5" in err
    assert list(work.iterdir()) == []


def test_an_existing_file_as_out_is_refused_and_kept(work, capsys, no_corpus):
    out = work / "model"
    out.write_text("mine")
    _refused(capsys, ["--out", str(out), *TINY], f"--out {out}: is a file")
    assert [p.name for p in work.iterdir()] == ["model"] and out.read_text() == "mine"


def test_a_non_empty_directory_as_out_is_refused_and_kept(work, capsys, no_corpus):
    out = work / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(capsys, ["--out", str(out), *TINY], f"--out {out}: exists and is not empty")
    assert [p.name for p in work.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_below_a_file_is_refused(work, capsys, no_corpus):
    (work / "file").write_text("mine")
    out = work / "file" / "sub" / "model"
    _refused(capsys, ["--out", str(out), *TINY],
             f"--out {out}: its folder {out.parent} cannot be created: {work / 'file'} is not a directory")
    assert [p.name for p in work.iterdir()] == ["file"]


def test_a_symlink_as_out_is_refused(work, capsys, no_corpus):
    (work / "target").mkdir()
    (work / "model").symlink_to(work / "target")
    _refused(capsys, ["--out", str(work / "model"), *TINY], f"--out {work / 'model'}: is a symbolic link")
    assert list((work / "target").iterdir()) == []


def test_a_missing_stdlib_root_is_refused(work, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(missing), *TINY],
             f"--stdlib-root {missing}: not a directory")
    assert list(work.iterdir()) == []


def test_a_stdlib_root_without_python_files_is_refused(work, tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "README.txt").write_text("no source here")
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(root), *TINY],
             f"--stdlib-root {root}: no *.py file under it")
    assert list(work.iterdir()) == []


def test_a_corpus_of_three_tiny_files_is_refused(work, tmp_path, capsys):
    root = tmp_path / "tiny"
    root.mkdir()
    for i in range(3):
        (root / f"m{i}.py").write_text(f"x = {i}\n")
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(root)],
             f"--stdlib-root {root}: the training text is", "--seq-len 256")
    assert list(work.iterdir()) == []


def test_a_corpus_without_held_out_text_is_refused(work, tmp_path, capsys):
    root = tmp_path / "train-only"
    root.mkdir()
    for name, module in zip(_names(False), TRAIN_MODULES, strict=False):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / module, root / name)
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(root), *TINY],
             "the evaluation text (held-out library files) is 0 bytes", "--eval-context 32")
    assert list(work.iterdir()) == []


def test_an_evaluation_text_short_in_tokens_is_refused_before_training(stdlib, work, capsys, monkeypatch):
    # A window as long as the held-out file in bytes: enough bytes, too few tokens once BPE merges them.
    size = (Path(sysconfig.get_paths()["stdlib"]) / "copy.py").stat().st_size
    monkeypatch.setattr(train, "_train_and_save", lambda *_: pytest.fail("training started"))
    _refused(capsys, ["--out", str(work / "model"), "--stdlib-root", str(stdlib), *TINY,
                      "--max-position-embeddings", str(size), "--eval-context", str(size)],
             " tokens, too short for one window of --eval-context")
    assert list(work.iterdir()) == []


def _fake_training(out_dir: Path, *_) -> dict:
    summary = {"steps": 1, "log": []}
    (out_dir / "training.json").write_text(train._summary_json(summary))
    return summary


def test_an_empty_directory_as_out_is_filled(stdlib, work, capsys, monkeypatch):
    monkeypatch.setattr(train, "_train_and_save", _fake_training)
    out = work / "model"
    out.mkdir()
    assert cli(["train-reference", "--out", str(out), "--stdlib-root", str(stdlib), *TINY]) == 0
    assert [p.name for p in work.iterdir()] == ["model"]
    assert {"training.json", "eval.txt", "corpus-manifest.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_the_sibling_of_a_killed_build_of_out_is_removed_and_nothing_else(stdlib, work, capsys, monkeypatch):
    from optimize.atomic import tmp_sibling

    monkeypatch.setattr(train, "_train_and_save", _fake_training)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = tmp_sibling(work / "x").name.split("@")[1]
    killed, others = work / f"model.tmp{dead}@{host}", work / f"notes.tmp{dead}@{host}"
    for d in (killed, others):
        d.mkdir()
    with pytest.warns(UserWarning, match="removed 1 temporary entry"):
        assert cli(["train-reference", "--out", str(work / "model"), "--stdlib-root", str(stdlib), *TINY]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["model", others.name]  # another name's: the user's


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failure_during_training_leaves_nothing_at_out(failure, stdlib, work, capsys, monkeypatch):
    out = work / "model"
    half_built = []

    def fail_at_first_step(step, cfg):
        # By now the tokenizer, eval.txt and manifest are written: they are in the sibling, not at --out.
        half_built.extend(p.name for d in work.iterdir() for p in d.iterdir())
        raise failure

    monkeypatch.setattr(train, "lr_at", fail_at_first_step)
    code = cli(["train-reference", "--out", str(out), "--stdlib-root", str(stdlib), *TINY])
    if isinstance(failure, KeyboardInterrupt):
        assert code == 130
    else:  # an unexpected error is the CLI's internal error: exit 3 with its cause, never 1 (a failed check)
        assert code == 3 and "infermatrix: internal error: RuntimeError: boom" in capsys.readouterr().err
    assert {"eval.txt", "tokenizer.json", "corpus-manifest.json"} <= set(half_built)
    assert list(work.iterdir()) == []


def test_an_out_filled_by_another_process_meanwhile_is_reported(stdlib, work, capsys, monkeypatch):
    out = work / "model"
    real = train.build_dir_atomically

    def racing(final, fill):
        final.mkdir()
        (final / "theirs.txt").write_text("another run")  # lands while ours is being built
        real(final, fill)

    monkeypatch.setattr(train, "_train_and_save", _fake_training)
    monkeypatch.setattr(train, "build_dir_atomically", racing)
    _refused(capsys, ["--out", str(out), "--stdlib-root", str(stdlib), *TINY],
             f"--out {out}: filled by another process during training")
    assert [p.name for p in work.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["theirs.txt"]
