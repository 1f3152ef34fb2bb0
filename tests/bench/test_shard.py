"""Shard assignment: every cell in exactly one shard, sizes within one, the same on every machine."""

from __future__ import annotations

import pytest

from bench.orchestrate import Shard
from optimize.errors import InputError


def _cells(n: int) -> list[dict]:
    return [{"cell_id": f"c{k}"} for k in range(n)]


def test_seven_cells_over_three_shards_cover_every_cell_once():
    cells = _cells(7)
    parts = [Shard(i, 3).select(cells) for i in (1, 2, 3)]
    ids = [c["cell_id"] for part in parts for c in part]
    assert sorted(ids) == sorted(c["cell_id"] for c in cells) and len(ids) == 7
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    # Round-robin over the stable order: shard i takes cells i-1, i-1+3, ...
    assert [[c["cell_id"] for c in p] for p in parts] == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]


@pytest.mark.parametrize("n_cells", [0, 1, 2, 5, 7, 12, 13])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_shards_partition_the_cells_with_sizes_within_one(n_cells, count):
    cells = _cells(n_cells)
    parts = [Shard(i, count).select(cells) for i in range(1, count + 1)]
    ids = [c["cell_id"] for p in parts for c in p]
    assert sorted(ids) == sorted(c["cell_id"] for c in cells)
    assert len(ids) == len(set(ids))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:  # each shard keeps the stable cell order
        assert p == [c for c in cells if c in p]


def test_shard_parse_and_str_round_trip():
    for text in ("1/1", "1/3", "2/3", "3/3", " 2 / 3 "):
        shard = Shard.parse(text)
        assert str(shard) == text.replace(" ", "")
    assert Shard.parse("2/3") == Shard(2, 3)


@pytest.mark.parametrize("text, match", [
    ("2", r"--shard must look like i/n \(e\.g\. 1/2\), got '2'"),
    ("a/b", "--shard must look like i/n"),
    ("1/2/3", "--shard must look like i/n"),
    ("", "--shard must look like i/n"),
    ("\uff11/\uff12", "--shard must look like i/n"),  # full-width digits, which int() would take
    ("0/2", r"--shard 0/2: need 1 <= i <= n"),
    ("3/2", r"--shard 3/2: need 1 <= i <= n"),
])
def test_shard_parse_rejects_bad_text(text, match):
    with pytest.raises(InputError, match=match):
        Shard.parse(text)
