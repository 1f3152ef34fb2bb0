"""History: runs' key metrics per commit in SQLite, shown and plotted across commits."""

from __future__ import annotations

import json

import numpy as np

from bench import history
from bench.cli import main as cli
from tests.bench.gate_helpers import synthetic_run


def test_add_and_show_a_metric_across_commits(tmp_path, capsys):
    rng = np.random.default_rng(0)
    db = tmp_path / "h.sqlite"
    for i, slow in enumerate((1.0, 1.0, 1.5)):
        run = synthetic_run(tmp_path / f"run{i}", rng, cells=2, cv=0.01, slowdown={"v0": slow}, commit=f"{i:040x}")
        assert cli(["history", "add", str(run), "--db", str(db), "--commit", f"c{i}" + "0" * 38]) == 0
    points = history.series(db, "tpot_ms", cell="v0")
    assert [p["commit"][:2] for p in points] == ["c0", "c1", "c2"]
    assert points[2]["median"] / points[0]["median"] > 1.4 and points[0]["n"] == 5
    assert cli(["history", "show", "--db", str(db), "--metric", "tpot_ms", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("synthetic:llama-tiny v0") == 3 and out.count("synthetic:llama-tiny v1") == 3
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_commit_defaults_to_the_run_and_duplicates_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository: the run's own recorded commit is used
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 0
    assert history.series(tmp_path / "h.sqlite", "ttft_ms")[0]["commit"] == "ab" * 20
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 2
    assert "already in" in capsys.readouterr().err
    assert cli(["history", "show", "--db", "h.sqlite", "--metric", "nonsense"]) == 2


def test_plot_goes_where_asked_or_the_flag_is_refused(tmp_path, capsys):
    """Seen: --plot into a missing folder ended in a FileNotFoundError traceback, after the table was printed."""
    db = tmp_path / "h.sqlite"
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="cd" * 20)
    assert cli(["history", "add", str(run), "--db", str(db)]) == 0
    show = ["history", "show", "--db", str(db), "--metric", "tpot_ms", "--plot"]
    assert cli([*show, str(tmp_path / "new" / "dir" / "p.svg")]) == 0
    assert (tmp_path / "new" / "dir" / "p.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["p.svg"]  # no temporary left
    capsys.readouterr()
    for bad, needle in ((tmp_path / "p.jpeg", "must end in .png or .svg"), (tmp_path / "p", "must end in"),
                        (tmp_path / "new.png", "is a directory")):
        if bad.name == "new.png":
            bad.mkdir()
        assert cli([*show, str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_the_cell_filter_matches_its_text_literally(tmp_path, capsys):
    from tests.bench.gate_helpers import record, timing_samples, write_run

    rng = np.random.default_rng(0)
    names = ("kv_int4", "kvXint4", "prune-50%", "prune-500")
    run = write_run(tmp_path / "run", [record(v, timing_samples(rng, 5, 0.02)) for v in names])
    db = tmp_path / "h.sqlite"
    history.add_run(db, run)
    assert [p["cell"].split()[1] for p in history.series(db, "tpot_ms", cell="kv_int4")] == ["kv_int4"]
    assert [p["cell"].split()[1] for p in history.series(db, "tpot_ms", cell="prune-50%")] == ["prune-50%"]
    assert len(history.series(db, "tpot_ms", cell="prune-50")) == 2 and len(history.series(db, "tpot_ms")) == 4
    assert cli(["history", "show", "--db", str(db), "--metric", "tpot_ms", "--cell", "kv_int4"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].endswith("kv_int4 cpu generate 1/16/8")
    # The figure in the reports' display unit and format, the unit in the header (bytes shown as MiB).
    assert cli(["history", "show", "--db", str(db), "--metric", "peak_memory_bytes", "--cell", "kv_int4"]) == 0
    head, row = capsys.readouterr().out.splitlines()
    assert head.split() == ["commit", "started", "median", "MiB", "n", "cell"]
    peak = history.series(db, "peak_memory_bytes", cell="kv_int4")[0]["median"]
    assert row.split()[2:4] == [f"{peak / 2**20:.1f}", "1"]


def test_a_plot_of_no_figures_says_so_instead_of_writing_nothing_silently(tmp_path, capsys):
    db = tmp_path / "h.sqlite"
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="cd" * 20)
    assert cli(["history", "add", str(run), "--db", str(db)]) == 0
    capsys.readouterr()
    plot = tmp_path / "p.png"
    assert cli(["history", "show", "--db", str(db), "--metric", "tpot_ms", "--cell", "nothing", "--plot",
                str(plot)]) == 0
    assert capsys.readouterr().err == (f"infermatrix history: no plot written: {db} holds no tpot_ms figures of "
                                       "cells matching 'nothing'\n")
    assert not plot.exists()


def test_a_run_short_of_cells_is_added_only_when_asked_and_then_with_a_warning(tmp_path, capsys):
    """Once added, a run cannot be added again: an interrupted one would keep its finished self out."""
    import json

    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=2, commit="ef" * 20)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "ended": None, "missing_shards": ["2/2"]}))
    db = tmp_path / "h.sqlite"
    assert cli(["history", "add", str(run), "--db", str(db)]) == 2
    assert capsys.readouterr().err == (
        f"infermatrix history: error: {run}: it has not ended (interrupted, or still running); it was merged without "
        f"shards 2/2: finish it ('infermatrix run --resume {run}'), or add what it holds with --partial (a run is "
        "added once)\n")
    assert not db.exists()
    assert cli(["history", "add", str(run), "--db", str(db), "--partial"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"infermatrix history: warning: {run}: it has not ended") and "2 cells" in out
    assert len({p["cell"] for p in history.series(db, "tpot_ms")}) == 2
    assert cli(["history", "add", str(tmp_path / "nowhere", ), "--db", str(db)]) == 2
    assert capsys.readouterr().err.endswith("nowhere is not a run directory (no run.json)\n")


def test_a_shard_is_short_of_its_matrix_cells_so_it_is_not_added_as_a_whole_run(tmp_path, capsys):
    """Seen: a shard was added without --partial, then the merged run too: each figure twice in `history show`."""
    import json

    run = synthetic_run(tmp_path / "s1", np.random.default_rng(0), cells=2, commit="ef" * 20)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "shard": "1/2"}))
    db = tmp_path / "h.sqlite"
    assert cli(["history", "add", str(run), "--db", str(db)]) == 2
    assert (f"{run}: it is shard 1/2 of its matrix (add the run 'infermatrix merge' makes of the shards)"
            in capsys.readouterr().err)
    assert not db.exists()
    (run / "run.json").write_text(json.dumps({**meta, "shard": "1/1"}))  # the whole matrix
    assert cli(["history", "add", str(run), "--db", str(db)]) == 0


def test_the_run_s_recorded_commit_wins_over_head_of_the_repository_here(tmp_path, capsys, monkeypatch):
    """Seen: added from inside an unrelated repository, the run was filed under that repository's HEAD."""
    from tests.bench.gitrepo import git

    repo = tmp_path / "other"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "commit", "-q", "--allow-empty", "-m", "unrelated")
    head = git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.chdir(repo)
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    assert cli(["history", "add", str(run), "--db", str(tmp_path / "h.sqlite")]) == 0
    assert history.series(tmp_path / "h.sqlite", "ttft_ms")[0]["commit"] == "ab" * 20
    assert capsys.readouterr().err == (f"infermatrix history: warning: {run} recorded commit {'ab' * 6}, HEAD here "
                                       f"is {head[:12]}: added under the recorded commit (--commit names another)\n")


def test_a_run_recording_no_commit_takes_head_here(tmp_path, capsys, monkeypatch):
    import json

    from tests.bench.gitrepo import git

    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "here")
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    meta = json.loads((run / "run.json").read_text())
    meta["environment"]["git"] = {"commit": None, "dirty": None}
    (run / "run.json").write_text(json.dumps(meta))
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 0
    assert history.series(tmp_path / "h.sqlite", "ttft_ms")[0]["commit"] == git(tmp_path, "rev-parse", "HEAD").strip()
    assert "warning" not in capsys.readouterr().err


def test_a_run_without_a_start_time_is_added_once(tmp_path, capsys, monkeypatch):
    """UNIQUE (run_dir, started) holds two NULL starts apart: such a run was added twice."""
    import json

    monkeypatch.chdir(tmp_path)
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    meta = json.loads((run / "run.json").read_text())
    meta.pop("started", None)
    (run / "run.json").write_text(json.dumps(meta))
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 0
    capsys.readouterr()
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 2
    assert capsys.readouterr().err == f"infermatrix history: error: {run} (started None) is already in h.sqlite\n"
    assert len(history.series(tmp_path / "h.sqlite", "ttft_ms")) == 1


def test_the_recorded_commit_is_the_ab_sides_then_the_users_repository_then_the_harness():
    from bench.commands.history import recorded_commit

    env = {"git": {"commit": "1" * 40}, "user_repository": {"path": "/x", "commit": "2" * 40}}
    assert recorded_commit({"environment": env, "ab": {"side": "head", "commit": "3" * 40}}) == "3" * 40
    assert recorded_commit({"environment": env}) == "2" * 40  # what was benchmarked, not the harness
    assert recorded_commit({"environment": {**env, "user_repository": {"path": "/x", "commit": None}}}) == "1" * 40
    assert recorded_commit({"environment": {"git": None, "user_repository": "?"}}) is None
    assert recorded_commit({}) is None


def test_a_copy_of_a_run_added_is_refused_naming_where_it_came_from(tmp_path, capsys, monkeypatch):
    """CI downloads a run's artifact to a new path each job: keyed by path, a copy was added again and every
    figure of it showed twice."""
    import shutil

    monkeypatch.chdir(tmp_path)
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    assert cli(["history", "add", str(run), "--db", "h.sqlite"]) == 0
    shutil.copytree(run, tmp_path / "copy")
    capsys.readouterr()
    assert cli(["history", "add", str(tmp_path / "copy"), "--db", "h.sqlite"]) == 2
    started = json.loads((run / "run.json").read_text())["started"]
    assert capsys.readouterr().err == (f"infermatrix history: error: {tmp_path / 'copy'} (started {started})"
                                       f" is already in h.sqlite, added from {run.resolve()}\n")
    assert len(history.series(tmp_path / "h.sqlite", "ttft_ms")) == 1
    # The other side of an ab job started in the same second on the same host: another run.
    other = synthetic_run(tmp_path / "base", np.random.default_rng(1), cells=1, commit="cd" * 20)
    meta = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**meta, "started": started}))
    assert cli(["history", "add", str(other), "--db", "h.sqlite"]) == 0
    assert len(history.series(tmp_path / "h.sqlite", "ttft_ms")) == 2


def test_a_database_made_before_runs_had_an_identity_takes_new_runs_and_keeps_its_own(tmp_path, capsys):
    import shutil
    import sqlite3

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(history.SCHEMA.replace(" identity TEXT,", ""))
    con.execute("INSERT INTO runs (run_dir, commit_sha, started, added, environment, fingerprint) "
                "VALUES ('/old', 'x', '2025-01-01T00:00:00Z', '2025-01-01T00:00:00Z', '{}', '{}')")
    con.commit()
    con.close()
    run = synthetic_run(tmp_path / "run", np.random.default_rng(0), cells=1, commit="ab" * 20)
    assert cli(["history", "add", str(run), "--db", str(db)]) == 0
    shutil.copytree(run, tmp_path / "copy")
    assert cli(["history", "add", str(tmp_path / "copy"), "--db", str(db)]) == 2
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT run_dir, identity IS NULL FROM runs ORDER BY id").fetchall() == [
            ("/old", 1), (str(run.resolve()), 0)]


def test_a_runs_identity_is_its_start_host_matrix_shard_ab_side_and_revision():
    from bench.results import run_identity

    run = {"started": "2026-01-01T00:00:00Z", "matrix_hash": "m", "shard": None,
           "environment": {"hostname": "h", "git": {"commit": "1" * 40}}}
    assert run_identity(run) == run_identity(json_copy(run)) and len(run_identity(run)) == 20
    for change in ({"started": "2026-01-01T00:00:01Z"}, {"matrix_hash": "n"}, {"shard": [1, 2]},
                   {"ab": {"side": "base", "commit": "2" * 40}}, {"environment": {"hostname": "g"}},
                   {"environment": {"hostname": "h", "git": {"commit": "3" * 40}}}):
        assert run_identity({**run, **change}) != run_identity(run), change
    assert run_identity({**run, "started": None}) is None


def json_copy(value):
    import json

    return json.loads(json.dumps(value))
