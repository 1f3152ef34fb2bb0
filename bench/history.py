"""Run history in SQLite: one row per run (commit, environment), key metric medians per cell.

A metric across commits is then one query; ``show`` prints it and ``plot`` draws it.
"""

from __future__ import annotations

import io
import json
import sqlite3
import statistics
from pathlib import Path
from typing import Any

from bench.compare import environment_fingerprint, gated_metrics, load_side, metric_blocks
from bench.results import utc_now
from optimize.atomic import write_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, run_dir TEXT NOT NULL, commit_sha TEXT, started TEXT, added TEXT NOT NULL,
    environment TEXT NOT NULL, fingerprint TEXT NOT NULL, identity TEXT, UNIQUE (run_dir, started));
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id), cell TEXT NOT NULL, metric TEXT NOT NULL,
    median REAL NOT NULL, n INTEGER NOT NULL, unit TEXT, direction TEXT, PRIMARY KEY (run_id, cell, metric));
"""


def connect(db: Path, create: bool = True) -> sqlite3.Connection:
    """The history database ``db``: created when missing (``create``), else opened read-only, so that showing
    never writes. A file that is not such a database (another SQLite file, not SQLite) is an ``InputError``.
    """
    from optimize.errors import InputError

    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        header = None  # a new database, where ``create``
    except OSError as exc:
        raise InputError(f"--db {db}: {exc.strerror}") from None
    # SQLite would take a short or empty file as an empty database: a history artifact whose download failed
    # (0 bytes) would then be replaced by a new database, every earlier run lost
    if header != b"SQLite format 3\x00" and (header is not None or not create):
        raise InputError(f"--db {db}: not an infermatrix history database "
                         f"({'an empty file' if header == b'' else 'not an SQLite file'})")
    try:
        if create:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(db)
            con.executescript(SCHEMA)
            _add_identity(con)
        else:
            con = sqlite3.connect(f"{Path(db).absolute().as_uri()}?mode=ro", uri=True)
        for table, columns in (("runs", "run_dir, commit_sha, started, fingerprint"),
                               ("metrics", "run_id, cell, metric, median, n, unit")):
            con.execute(f"SELECT {columns} FROM {table} LIMIT 0")
    except (sqlite3.Error, OSError) as exc:
        raise InputError(f"--db {db}: not an infermatrix history database ({exc})") from None
    return con


def _add_identity(con: sqlite3.Connection) -> None:
    """The runs' identity column (``bench.results.run_identity``), added to a database made before it had one;
    unique where known (a database's earlier rows have none).
    """
    if "identity" not in {row[1] for row in con.execute("PRAGMA table_info(runs)")}:
        con.execute("ALTER TABLE runs ADD COLUMN identity TEXT")
    con.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_identity ON runs (identity)")


def add_run(db: Path, run_dir: Path, commit: str | None = None) -> dict[str, Any]:
    """Append a run's gated metrics (median over all its repetitions per cell) to ``db``.

    Returns:
        {"run_id", "commit", "cells", "metrics"}; a run already added is not added twice, from this
        directory or from a copy of it elsewhere (an artifact downloaded to a new path each job).

    """
    from bench.results import run_identity
    from optimize.errors import InputError

    side = load_side(run_dir)
    env = side.run.get("environment", {})
    commit = commit or (env.get("git") or {}).get("commit")
    started, identity = side.run.get("started"), run_identity(side.run)
    with connect(db) as con:
        # UNIQUE (run_dir, started) holds NULLs apart: a run with no start time is looked for by hand (IS matches NULL)
        there = con.execute("SELECT run_dir FROM runs WHERE (run_dir = ? AND started IS ?) OR identity = ?",
                            (str(Path(run_dir).resolve()), started, identity)).fetchone()
        if there:
            raise InputError(f"{run_dir} (started {started}) is already in {db}"
                             + ("" if there[0] == str(Path(run_dir).resolve()) else f", added from {there[0]}"))
        try:
            cur = con.execute("INSERT INTO runs (run_dir, commit_sha, started, added, environment, fingerprint, "
                              "identity) VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (str(Path(run_dir).resolve()), commit, started,
                               utc_now(), json.dumps(env, default=str),
                               json.dumps(environment_fingerprint(env), sort_keys=True, default=str), identity))
        except sqlite3.IntegrityError:
            raise InputError(f"{run_dir} (started {started}) is already in {db}") from None
        rows = []
        for cell, records in side.ok.items():
            for m in gated_metrics():
                blocks = metric_blocks(records, m.key)
                if blocks:
                    values = [x for b in blocks for x in b]
                    rows.append((cur.lastrowid, cell, m.key, statistics.median(values), len(values), m.unit,
                                 m.direction))
        con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return {"run_id": cur.lastrowid, "commit": commit, "cells": len(side.ok), "metrics": len(rows)}


def series(db: Path, metric: str, cell: str | None = None) -> list[dict[str, Any]]:
    """The metric's median per run and cell, oldest run first."""
    query = ("SELECT r.id, r.commit_sha, r.started, m.cell, m.median, m.n, m.unit FROM metrics m "
             "JOIN runs r ON r.id = m.run_id WHERE m.metric = ?" + (" AND instr(m.cell, ?) > 0" if cell else "") +
             " ORDER BY r.started, r.id, m.cell")
    # instr: the text as written (LIKE would read _ and % in a variant name as wildcards)
    with connect(db, create=False) as con:
        rows = con.execute(query, (metric, cell) if cell else (metric,)).fetchall()
    keys = ("run_id", "commit", "started", "cell", "median", "n", "unit")
    return [dict(zip(keys, r, strict=True)) for r in rows]


PLOT_SUFFIXES = (".png", ".svg")


def plot(points: list[dict[str, Any]], metric: str, out: Path) -> Path:
    """A line per cell across runs, labelled by short commit (PNG or SVG by ``out``'s suffix, see PLOT_SUFFIXES)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys((p["run_id"], (p["commit"] or "?")[:8]) for p in points))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for cell in dict.fromkeys(p["cell"] for p in points):
        xs = [runs.index((p["run_id"], (p["commit"] or "?")[:8])) for p in points if p["cell"] == cell]
        ax.plot(xs, [p["median"] for p in points if p["cell"] == cell], marker="o", label=cell)
    ax.set_xticks(range(len(runs)), [c for _, c in runs], rotation=45, ha="right")
    ax.set_ylabel(f"{metric} (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(out).suffix.lstrip(".").lower())
    plt.close(fig)
    write_file(Path(out), buf.getvalue())
    return out
