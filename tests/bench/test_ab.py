"""``infermatrix ab``: two revisions of a repository, interleaved in one job, compared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from bench.ab import schedule
from bench.cli import main as cli
from tests.bench.gitrepo import git as _git

MATRIX = """
name = "ab-test"
models = ["synthetic:llama-tiny"]
variants = ["serve", "fp32"]
devices = ["cpu"]

[[recipe]]
name = "serve"
steps = []

[[scenarios]]
name = "generate"
# Without the cache each step recomputes 4 x 384+ tokens: the head is about 9x slower, a change the gate
# must call even when a neighbour's load makes whole processes vary by 50% (at batch 1 and 3x, it could not).
batch_size = [4]
prompt_tokens = [384]
new_tokens = [16]

[measure]
threads = 2  # the test's --threads 1 overrides it: a busy neighbour then takes the other core instead of stalling
warmup = 1
min_reps = 5
max_reps = 5
budget_s = 0
timeout_s = 300

[drift]
enabled = false
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository whose second commit makes the recipe `serve` turn the KV cache off."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "bench.toml").write_text(MATRIX)
    _git(repo, "add", "bench.toml")
    _git(repo, "commit", "-qm", "serve with the default cache")
    (repo / "bench.toml").write_text(MATRIX.replace("steps = []", 'steps = [{technique = "kv-cache", mode = "none"}]'))
    _git(repo, "commit", "-qam", "serve without KV cache")
    return repo


def test_schedule_interleaves_and_alternates_who_goes_first():
    order = schedule(["a", "b", "c"], rounds=4, seed=1)
    assert len(order) == 3 * 2 * 4
    pairs = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert all(p[0][0] == p[1][0] and {p[0][1], p[1][1]} == {"base", "head"} for p in pairs)
    firsts = Counter((p[0][0], p[0][1]) for p in pairs)
    assert all(firsts[(k, "base")] == firsts[(k, "head")] == 2 for k in "abc")
    round_orders = {tuple(k for k, _ in order[r * 6:(r + 1) * 6:2]) for r in range(4)}
    assert len(round_orders) > 1  # the cell order is shuffled per round


@pytest.mark.slow
def test_ab_head_minus_one_exits_1_naming_the_slowed_cell(repo, tmp_path, cache_dir, capsys):
    # --repo rather than a chdir: cell processes fork from a server that resolves imports against the
    # working directory it started in, and this checkout's code must be the one measured.
    out = tmp_path / "ab"
    rc = cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(out), "--quiet", "--rounds", "3",
              "--threads", "1", "--json", str(tmp_path / "c.json")])
    captured = capsys.readouterr()
    assert rc == 1, captured.out + captured.err
    regressed = [line for line in captured.err.splitlines() if line.startswith("regressed:")]
    assert regressed and all(" serve cpu generate 4/384/16: " in line for line in regressed)
    assert any("TPOT" in line or "decode" in line for line in regressed)
    data = json.loads((tmp_path / "c.json").read_text())
    assert not [r for r in data["rows"] if " fp32 " in r["cell"] and r["verdict"] == "regressed"]
    # each side: both cells three times (--rounds 3), in fresh processes; each side's run records its own revision
    for side in ("base", "head"):
        records = [json.loads(line) for line in (out / side / "results.jsonl").read_text().splitlines()]
        assert Counter(r["variant"] for r in records) == {"serve": 3, "fp32": 3}
        assert {r["method"]["torch_threads"] for r in records} == {1}  # --threads over the matrix's 2
        run = json.loads((out / side / "run.json").read_text())
        assert run["ab"]["rev"] == ("HEAD~1" if side == "base" else "HEAD")
        # the checkout measured, a clean worktree of the side's commit, not the one ab was started from
        sha = _git(repo, "rev-parse", "HEAD~1" if side == "base" else "HEAD").strip()
        assert run["environment"]["user_repository"] == {"path": str(repo), "commit": sha, "dirty": False}
        assert run["ended"] >= run["started"]  # a whole run: reports, select and history add take it as ended
    assert cli(["history", "add", str(out / "head"), "--db", str(tmp_path / "h.sqlite")]) == 0
    assert cli(["history", "add", str(out / "base"), "--db", str(tmp_path / "h.sqlite")]) == 0  # its own run
    head_serve = next(json.loads(line) for line in (out / "head" / "results.jsonl").read_text().splitlines()
                      if '"serve"' in line)
    assert head_serve["recipe"]["steps"][0]["mode"] == "none"  # the head's recipe came from the head's worktree
    ran = sorted((r["ab"]["position"], r["variant"], s) for s in ("base", "head")
                 for r in map(json.loads, (out / s / "results.jsonl").read_text().splitlines()))
    pairs = [ran[i:i + 2] for i in range(0, len(ran), 2)]
    assert all(a[1] == b[1] and {a[2], b[2]} == {"base", "head"} for a, b in pairs)  # A B or B A, same cell
    assert {a[2] for a, _ in pairs} == {"base", "head"}  # each side goes first sometimes
    assert len(_git(repo, "worktree", "list").splitlines()) == 1  # the temporary worktrees are gone
    # a side cut short resumes only with its job: neither history add nor run --resume sends the user elsewhere
    cut = tmp_path / "cut"
    shutil.copytree(out / "head", cut)
    run = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "ended"}))
    capsys.readouterr()
    assert cli(["history", "add", str(cut), "--db", str(tmp_path / "h2.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "it is the head side of an 'infermatrix ab' job: run the job again, or add what it holds with --partial" \
        in err and "--resume" not in err
    assert cli(["run", "--resume", str(cut)]) == 2
    assert "it is the head side of an 'infermatrix ab' job, which resumes only as a whole" in capsys.readouterr().err


def test_ab_bad_revision_and_not_a_repository(repo, tmp_path, capsys):
    assert cli(["ab", "no-such-rev", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(tmp_path / "x")]) == 2
    assert "revision 'no-such-rev' is not a commit" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli(["ab", "HEAD~1", "--repo", str(tmp_path / "plain"), "--out", str(tmp_path / "y")]) == 2
    assert "not inside a git repository" in capsys.readouterr().err


@pytest.mark.parametrize(("threads", "cause"), [
    ("-1", "threads must be a whole number >= 0 (0: torch's default), got -1"),
    ("4096", "threads must be at most the "),
])
def test_ab_threads_out_of_range_exits_2_before_anything_runs(repo, tmp_path, capsys, threads, cause):
    out = tmp_path / "ab"
    argv = ["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(out), "--threads", threads]
    assert cli(argv) == 2
    assert cause in capsys.readouterr().err
    assert not out.exists() and len(_git(repo, "worktree", "list").splitlines()) == 1


def test_two_ab_jobs_on_one_out_the_second_exits_2_naming_the_first(repo, tmp_path, capsys):
    """Seen: two jobs on one --out (the default's name is the second they start in) both passed, each side's
    results.jsonl holding the other job's records too, pooled into both verdicts."""
    import os

    from bench.runlock import RunLock

    out = tmp_path / "ab"
    with RunLock(out).acquire():  # the first job's, as it holds it for its whole run
        assert cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(out)]) == 2
        assert f"in use by another infermatrix run (PID {os.getpid()})" in capsys.readouterr().err
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_worktrees_are_removed_even_when_locked_by_an_interrupted_add(repo, tmp_path):
    """An add cut short leaves its tree locked ("initializing"), which one --force does not remove."""
    from bench.ab import remove_worktrees

    tree = tmp_path / "tmp-ab" / "head"
    _git(repo, "worktree", "add", "--detach", "--lock", str(tree), "HEAD")
    assert len(_git(repo, "worktree", "list").splitlines()) == 2
    remove_worktrees(repo, [tree, tmp_path / "tmp-ab" / "never-added"])
    assert len(_git(repo, "worktree", "list").splitlines()) == 1 and not tree.exists()


def test_a_matrix_error_at_a_revision_names_the_revision_not_the_temporary_worktree(repo, tmp_path, capsys):
    (repo / "bench.toml").write_text(MATRIX.replace("warmup = 1", "warmup = 1\nbogus = 1"))
    _git(repo, "commit", "-qam", "a typo")
    sha = _git(repo, "rev-parse", "HEAD").strip()
    assert cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err
    assert f"HEAD ({sha[:10]}):bench.toml [measure]: 'bogus' is not a measure setting" in err
    assert "infermatrix-ab-" not in err  # a folder removed before the user reads the message
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_worktrees_of_a_killed_ab_job_are_swept_by_the_next_and_a_live_jobs_kept(repo, tmp_path, capsys):
    from bench.ab import OWNER, TEMP_PREFIX

    dead = subprocess.Popen(["true"])
    dead.wait()
    killed, live, mine = tmp_path / f"{TEMP_PREFIX}killed" / "head", tmp_path / f"{TEMP_PREFIX}live" / "base", \
        tmp_path / "mine" / "head"
    for tree, owner in ((killed, dead.pid), (live, os.getpid()), (mine, dead.pid)):
        _git(repo, "worktree", "add", "--detach", str(tree), "HEAD")
        (tree.parent / OWNER).write_text(str(owner))
    orphan = tmp_path / f"{TEMP_PREFIX}no-owner" / "base"  # killed before it wrote its PID
    _git(repo, "worktree", "add", "--detach", str(orphan), "HEAD")
    # a job that stops early (bad --threads) has swept them first
    assert cli(["ab", "HEAD~1", "HEAD", "bench.toml", "--repo", str(repo), "--out", str(tmp_path / "ab"),
                "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert f"ab: removed 2 worktree(s) an ab job killed before it could clean up left in {repo}" in err
    listed = _git(repo, "worktree", "list")
    assert str(live) in listed and str(mine) in listed and str(killed) not in listed and str(orphan) not in listed
    assert not killed.parent.exists() and not orphan.parent.exists() and live.exists() and mine.exists()


def test_a_shallow_clone_says_so_when_the_base_revision_is_missing(repo, tmp_path, capsys):
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True)
    assert cli(["ab", "HEAD~1", "--repo", str(shallow), "--out", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err
    assert "revision 'HEAD~1' is not a commit of" in err and "a shallow clone: fetch the history it needs" in err
