"""A forked job's memory starts where a fresh process's would: the server's library pages resident again,
and a cold cache's one-time work kept out of the cell's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.metrics import resident
from bench.results import read_records

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
PAGE = resident.PAGE_BYTES

MAPS = """\
55d0c0000000-55d0c0002000 r--p 00000000 08:01 1234  /usr/bin/python3.11
55d0c0002000-55d0c0005000 r-xp 00002000 08:01 1234  /usr/bin/python3.11
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0     [heap]
7f0000000000-7f0000001000 ---p 00000000 08:01 99    /usr/lib/libtorch_cpu.so
7f0000001000-7f0000004000 r-xp 00001000 08:01 99    /usr/lib/lib torch (deleted)
7f0000010000-7f0000020000 rw-s 00000000 00:05 7     /dev/nvidia0
7f0000020000-7f0000030000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
"""


def test_file_mappings_are_the_readable_mappings_of_files_not_devices_or_anonymous_memory():
    assert resident.file_mappings(MAPS) == [
        (0x55D0C0000000, 0x55D0C0002000), (0x55D0C0002000, 0x55D0C0005000),
        (0x7F0000001000, 0x7F0000004000),  # a path with a space, and a deleted file: still mapped, still read
    ]


def test_present_runs_group_consecutive_present_pages():
    present, absent = 1 << 63, (1 << 62)  # bit 62 alone: swapped, not present
    entries = [present, present, absent, 0, present, 0, present, present, present]
    assert resident.present_runs(entries, 0x1000) == [
        (0x1000, 2 * PAGE), (0x1000 + 4 * PAGE, PAGE), (0x1000 + 6 * PAGE, 3 * PAGE)]
    assert resident.present_runs([], 0x1000) == []
    assert resident.present_runs([0, 0], 0x1000) == []
    assert resident.present_runs([present], 0x1000) == [(0x1000, PAGE)]


# A parent maps a 16 MiB file and reads it (resident, as the fork server's libraries are after its
# imports), lists its resident file pages, forks; the child reports its RssFile before and after.
FORKED = """
import json, mmap, os, sys
from bench.metrics import resident

def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024

if sys.argv[2] == "read":
    resident.MADV_POPULATE_READ = -1  # an advice the kernel refuses (EINVAL), as one before 5.14 does
with open(sys.argv[1], "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))
runs = resident.resident_file_pages()
parent = rss_file()
pid = os.fork()
if pid == 0:
    before = rss_file()
    note = resident.make_resident(runs)
    gone = resident.make_resident([(0x10000, resident.PAGE_BYTES)])  # nothing mapped there: a note, no signal
    print(json.dumps({"parent": parent, "before": before, "after": rss_file(), "note": note, "gone": gone,
                      "listed": sum(n for _, n in runs)}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("way", ["madvise", "read"])
def test_a_forked_child_gets_its_parents_resident_file_pages_back(tmp_path, way):
    """Without it the child's RSS leaves out the 16 MiB its parent had resident, and counts them as growth once
    touched; made resident again (either way), its RssFile is the parent's."""
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(16 * MIB))
    out = subprocess.run([sys.executable, "-c", FORKED, str(data), way], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["listed"] >= 16 * MIB  # the file, and what the interpreter has resident of its own files
    assert seen["before"] <= seen["parent"] - 15 * MIB  # fork left the mapping's pages out
    assert seen["after"] >= seen["parent"] - MIB, seen  # all back
    assert seen["note"] is None
    assert seen["gone"] is not None and "could not be made resident" in seen["gone"]


def test_make_resident_of_nothing_is_nothing():
    assert resident.make_resident([]) is None


@pytest.fixture
def mapped_file(tmp_path):
    """A 16 MiB file mapped into this process, none of its pages touched yet: (address, bytes)."""
    import ctypes
    import mmap

    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(16 * MIB))
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    view = ctypes.c_char.from_buffer(mapped)
    address = ctypes.addressof(view)
    del view  # an exported buffer keeps the map from closing
    yield address, len(mapped)
    mapped.close()


def _listed_bytes(address: int, length: int) -> int:
    """Bytes of [address, address + length) among this process's resident file pages."""
    return sum(max(0, min(a + n, address + length) - max(a, address)) for a, n in resident.resident_file_pages())


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.parametrize("way", ["madvise", "read"])
def test_make_resident_faults_the_pages_in_and_the_listing_sees_them(mapped_file, monkeypatch, way):
    """In this process: an untouched mapping is listed as nothing; made resident (by madvise, or page by page
    through /proc/self/mem where the kernel refuses the advice), every page of it is listed and in RssFile."""
    address, length = mapped_file
    if way == "read":
        monkeypatch.setattr(resident, "MADV_POPULATE_READ", -1)  # refused with EINVAL, as before Linux 5.14
    assert _listed_bytes(address, length) == 0
    before = _rss_file()
    assert resident.make_resident([(address, length)]) is None
    assert _listed_bytes(address, length) == length
    assert _rss_file() - before >= length - MIB


def test_a_run_no_longer_mapped_is_passed_over_and_counted(mapped_file, monkeypatch):
    address, length = mapped_file
    gone = (0x10000, 2 * PAGE)  # below any mapping Linux allows (vm.mmap_min_addr)
    # A fault maps the pages around it too where the page cache holds them (large folios): only the pages asked
    # for are checked. The mapping's first and last page are at least 16 MiB apart.
    last = address + length - PAGE
    note = resident.make_resident([(address, PAGE), gone, (0x20000, PAGE), (last, PAGE)])
    assert note == "2 of 4 runs of the fork server's library pages could not be made resident"
    assert _listed_bytes(address, PAGE) == _listed_bytes(last, PAGE) == PAGE
    middle = address + length // 2
    assert _listed_bytes(middle, PAGE) == 0
    monkeypatch.setattr(resident, "MADV_POPULATE_READ", -1)
    note = resident.make_resident([(middle, PAGE), gone])
    assert note == "2 of the fork server's library pages could not be made resident"  # the gone run's 2 pages
    assert _listed_bytes(middle, PAGE) == PAGE


def test_the_fallback_says_so_when_proc_self_mem_cannot_be_opened(monkeypatch):
    monkeypatch.setattr(resident, "MADV_POPULATE_READ", -1)

    def refused(path, flags):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(resident.os, "open", refused)
    assert resident.make_resident([(0x10000, PAGE)]) == (
        "the fork server's library pages were not made resident: /proc/self/mem (Permission denied)")


def test_the_listing_is_empty_where_proc_cannot_tell(monkeypatch):
    def missing(path, mode="r"):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(resident, "open", missing, raising=False)
    assert resident.resident_file_pages() == []


def _cell_records(tmp_path, name: str, cache: Path) -> list[dict]:
    run_dir = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", "synthetic:llama-tiny", "--variants",
                           "fp32", "--device", "cpu", "--batch-size", "1", "--prompt-tokens", "16", "--new-tokens",
                           "4", "--no-drift", "--min-reps", "2", "--max-reps", "2", "--warmup", "0", "--budget-s", "0",
                           "--threads", "1", "--out", str(run_dir), "--quiet", "--no-report"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "INFERMATRIX_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_records(run_dir)
    assert [r["status"] for r in records] == ["ok"], records
    return records


@pytest.mark.slow
def test_a_cells_memory_starts_where_a_fresh_process_that_imported_the_same_would(tmp_path):
    """The cell's pre-load RSS against a fresh interpreter's after importing what the fork server imports.

    Measured: 305 MiB for a cell before its server's pages were made resident again, 400 MiB after; a fresh
    interpreter 400 MiB. And the first cell on a cold cache (the synthetic model written, the evaluation text
    encoded in the cell) had a 48 MiB higher serving peak than the same cell on a warm one: 75 vs 27 MiB of
    growth; with that work in a child of the cell, 26.6 vs 26.9.
    """
    cache = tmp_path / "cache"
    cold = _cell_records(tmp_path, "cold", cache)[0]["metrics"]
    assert any((cache / "tokens").iterdir())  # the first run filled the cache
    warm = _cell_records(tmp_path, "warm", cache)[0]["metrics"]
    out_file = tmp_path / "fresh.json"
    code = ("import json, sys, psutil, bench.preload\n"  # the server's imports (its output goes to its log)
            f"open({str(out_file)!r}, 'w').write(json.dumps(psutil.Process().memory_info().rss))\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "INFERMATRIX_CACHE": str(cache)})
    fresh = json.loads(out_file.read_text())
    for metrics in (cold, warm):
        assert abs(metrics["rss_baseline_bytes"] - fresh) <= 0.05 * fresh + 16 * MIB, (metrics, fresh)
    growth = [m["serving_peak_memory_bytes"] - m["rss_baseline_bytes"] for m in (cold, warm)]
    assert abs(growth[0] - growth[1]) <= 8 * MIB, growth
