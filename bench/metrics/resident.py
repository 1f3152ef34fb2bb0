"""The file pages the fork server had resident, made resident again in each job it forks.

``fork()`` copies no page-table entries of a file mapping that the process never wrote to
(library code, read-only data): a job forked from the server has torch's libraries mapped
but not resident, and each page of them it touches then counts as growth of its RSS. A fresh
process that imported the same modules has those pages resident before it does anything.
Measured with torch and transformers imported (2-core VM, torch 2.13 CPU): the server 376 MiB
RSS, 97 MiB of it file pages; a job forked from it 285 MiB, 6 MiB of file pages; after the same
tiny ``generate()`` the job's RSS had grown 114 MiB, the server's 23 MiB. So the server lists its
resident file pages once, after its imports, and each job makes them resident again before its
first memory reading (one ``madvise(MADV_POPULATE_READ)`` per run of pages, Linux 5.14+; older
kernels: one read of ``/proc/self/mem`` per page, which faults the page in and reports an error
where a signal would kill the process): its RSS then starts where a fresh process's would.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os

MADV_POPULATE_READ = 22  # linux/mman.h, 5.14+: fault in readable pages, no signal on failure
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63  # /proc/PID/pagemap: bit 63 = page present in RAM (shown to unprivileged readers)


def file_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, end) addresses of the readable mappings of files in ``/proc/self/maps`` text.

    Device files (``/dev/...``) are left out: mapping a device's memory again is not
    what a fresh process would have done, and reading it may have side effects.
    """
    spans = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith("/dev/") or fields[1][0] != "r":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        spans.append((start, end))
    return spans


def present_runs(entries, start: int) -> list[tuple[int, int]]:
    """Runs of present pages, as (address, bytes), from the pagemap entries of pages from ``start``."""
    runs, first = [], None
    for i, entry in enumerate(entries):
        if entry & _PRESENT:
            if first is None:
                first = i
        elif first is not None:
            runs.append((start + first * PAGE_BYTES, (i - first) * PAGE_BYTES))
            first = None
    if first is not None:
        runs.append((start + first * PAGE_BYTES, (len(entries) - first) * PAGE_BYTES))
    return runs


def resident_file_pages() -> list[tuple[int, int]]:
    """Resident pages of this process's file mappings, as runs of (address, bytes); [] where /proc cannot tell."""
    runs: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for start, end in file_mappings(maps.read()):
                pagemap.seek(start // PAGE_BYTES * 8)  # one 64-bit entry per page
                entries = array.array("Q")
                entries.frombytes(pagemap.read((end - start) // PAGE_BYTES * 8))
                runs.extend(present_runs(entries, start))
    except (OSError, ValueError):
        return []
    return runs


def make_resident(runs: list[tuple[int, int]]) -> str | None:
    """Fault in the given runs of pages in this process; None when done, else why not all of them.

    A run that is no longer mapped (or lies past the end of a truncated file) is passed over:
    both calls report that as an error instead of raising a signal.
    """
    if not runs:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    missed = 0
    for i, (address, length) in enumerate(runs):
        if libc.madvise(address, length, MADV_POPULATE_READ) == 0:
            continue
        if ctypes.get_errno() == errno.EINVAL:  # a kernel before 5.14: read them instead
            return _read_pages(runs[i:])
        missed += 1
    return f"{missed} of {len(runs)} runs of the fork server's library pages could not be made resident" if missed \
        else None


def _read_pages(runs: list[tuple[int, int]]) -> str | None:
    """Fault in each page by reading one byte of it through ``/proc/self/mem``."""
    missed = 0
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError as exc:
        return f"the fork server's library pages were not made resident: /proc/self/mem ({exc.strerror})"
    try:
        for address, length in runs:
            for page in range(address, address + length, PAGE_BYTES):
                try:
                    os.pread(fd, 1, page)
                except OSError:
                    missed += 1
    finally:
        os.close(fd)
    return f"{missed} of the fork server's library pages could not be made resident" if missed else None
