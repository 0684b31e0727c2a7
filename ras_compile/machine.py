"""What machine a measurement ran on, and whether other processes disturbed it.

Small helpers shared by ``ras-compile demo``, ``benchmarks/bench_speed.py`` and
``benchmarks/bench_quality.py``. CPU timings are only trustworthy on a quiet machine:
with torch's default of one thread per core, a single busy process elsewhere makes
the threads wait for each other at every parallel region. :func:`cpu_seconds` read
before and after a timed interval and :func:`other_cpu_cores` give how many cores
other processes kept busy meanwhile; :func:`contended` says whether that exceeds the
cores the torch threads leave free.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["CONTENTION_MARGIN", "cpu_model", "cores_available", "load_average", "cpu_seconds", "other_cpu_cores",
           "contended"]

#: Cores of other load, beyond those the torch threads leave free, that flag a timing as contended.
CONTENTION_MARGIN = 0.25


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores_available() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds this process and its
    finished children have used), or None off Linux.

    Their differences over an interval give the CPU that *other* processes used in it
    (Inductor's idle compile workers count as other; they are idle while we time)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def other_cpu_cores(before, after, wall_s: float) -> float | None:
    """Mean number of cores other processes kept busy between two :func:`cpu_seconds` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def contended(other_cores: float | None, torch_threads: int, margin: float = CONTENTION_MARGIN) -> bool:
    """True when other processes used more than the cores ``torch_threads`` leave free (plus ``margin``)."""
    return other_cores is not None and other_cores > max(0, cores_available() - torch_threads) + margin
