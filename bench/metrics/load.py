"""What else the machine was doing while a cell was measured, and whether its figures are noisy.

Recorded beside the samples so a reader (and ``compare``) can tell a slow variant from a
busy machine: the 1-minute load average at start and end, and the CPU time the rest of the
machine used during the timed repetitions (all CPUs' busy time less this process's own).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _busy_s() -> float | None:
    try:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)
    except Exception:  # /proc not readable (containers, other systems): load stays unrecorded
        return None


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextmanager
def machine_load() -> Iterator[dict[str, Any]]:
    """Fills the yielded dict with the machine's load over the ``with`` block."""
    out: dict[str, Any] = {}
    cpus = os.cpu_count() or 1
    start = (time.perf_counter(), _busy_s(), _own_s(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    try:
        yield out
    finally:
        wall, busy, own = time.perf_counter() - start[0], _busy_s(), _own_s()
        out.update(wall_s=wall, cpu_count=cpus, loadavg_1m_start=start[3],
                   loadavg_1m_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        if busy is not None and start[1] is not None:
            other = max(0.0, (busy - start[1]) - (own - start[2]))
            out.update(other_cpu_s=other, other_cpu_fraction=other / (wall * cpus) if wall > 0 else None)


def noise_mark(samples: dict[str, Any], target_rel_ci: float) -> dict[str, Any]:
    """``noisy`` and the CI width reached, from the end-to-end (else TTFT) repetitions."""
    from bench.metrics.timing import rel_ci_half_width

    key = "e2e_ms" if samples.get("e2e_ms") else "ttft_ms"
    values = samples.get(key) or []
    if len(values) < 2 or target_rel_ci <= 0:
        return {}
    width = rel_ci_half_width(values)
    return {"noisy": width > target_rel_ci,
            "noise": {"metric": key, "rel_ci_half_width": width, "target_rel_ci": target_rel_ci, "n": len(values)}}
