"""How many cores a command may use: the ones actually free, with waits that soon sleep.

A CPU-bound command sized to every core slows down many times when another process holds
one of them: OpenMP's worker threads spin at every barrier (a core's worth of waiting taken
from the neighbour and from the work), and each parallel region waits for its slowest
thread, the one sharing a core with the neighbour (fit-head logreg on the demo: 0.7 s quiet,
8.0 s beside one `while 1: pass`; 0.9 s with one thread). Cron jobs, CI and laptops are
shared machines. So a command sizes its threads from the cores that are idle when it starts
(the kernel's per-CPU counters over 0.1 s, within this process's CPU affinity and cgroup
quota), for torch and for the BLAS numpy and scikit-learn use; that alone took fit-head
logreg on 20,000 x 64 rows beside a burner from 22.7 s to 7.1 s (quiet: 6.6 s).

OpenMP's threads then spin only briefly before they sleep: ``GOMP_SPINCOUNT=10000`` (about
tens of microseconds; GNU OpenMP's default is 300,000, and a neighbour that starts after the
command pays for every spin). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) was measured and
rejected: each of the solver's many small parallel regions then waits for threads to wake,
and the quiet demo fit took 8.4 s instead of 6.4 s. The variable must be in the environment
before torch loads its OpenMP runtime, so :func:`prefer_short_spins` runs before the first
``import torch`` (``cli.py`` and ``pipeline/__init__.py``); a user's own ``OMP_WAIT_POLICY``
or ``GOMP_SPINCOUNT`` is kept.

``FEATCACHE_THREADS=N`` fixes the count; ``FEATCACHE_THREADS=all`` leaves torch and OpenMP
their own defaults (every core, spinning waits), as before this module existed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

BUSY = 0.5  # a CPU busy this share of the sampling window is taken


THREADS_VARIABLE = "FEATCACHE_THREADS"  # N: that many threads; "all": torch's and OpenMP's own defaults


SPIN_COUNT = "10000"  # GNU OpenMP's busy-wait iterations before a thread sleeps (module doc)


def prefer_short_spins() -> None:
    """OpenMP threads that spin briefly, then sleep (unless the environment already chose a
    policy or count, or ``FEATCACHE_THREADS=all`` leaves the runtimes their defaults)."""
    if os.environ.get(THREADS_VARIABLE, "").strip().lower() == "all" or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def quota_cores() -> int | None:
    """A cgroup v2 CPU quota in cores (a container limited to 1.5 CPUs: 1), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def _cpu_times() -> dict[int, tuple[int, int]]:
    """cpu -> (busy, total) jiffies since boot, from /proc/stat ({} where there is none)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *values = line.split()
                    ticks = [int(v) for v in values[:8]]
                    idle = ticks[3] + ticks[4]  # idle + iowait
                    out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    except (OSError, ValueError):
        return {}
    return out


def busy_cpus(window: float = 0.1) -> set[int]:
    """The CPUs other work kept busy for more than ``BUSY`` of a ``window``-second sample."""
    before = _cpu_times()
    if not before:
        return set()
    time.sleep(window)
    after = _cpu_times()
    busy = set()
    for cpu, (b0, t0) in before.items():
        b1, t1 = after.get(cpu, (b0, t0))
        if t1 > t0 and (b1 - b0) / (t1 - t0) > BUSY:
            busy.add(cpu)
    return busy


def free_cores(window: float = 0.1) -> int:
    """Cores this process may use that nothing else is using now (at least 1)."""
    cpus = usable_cpus()
    free = len([c for c in cpus if c not in busy_cpus(window)])
    quota = quota_cores()
    return max(1, min(free, quota) if quota else free)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def use_free_cores(threads: int | None = None) -> int | None:
    """Size torch's and the BLAS libraries' threads to ``threads``, or to the cores free now;
    returns the count, or None when the user's environment already set ``OMP_NUM_THREADS`` (kept).

    Before torch is imported the environment carries the count (torch, OpenMP and the BLAS
    read it when they load; decoder processes inherit it); after, torch is told directly and
    the BLAS through threadpoolctl (which scikit-learn brings)."""
    import sys

    wanted = os.environ.get(THREADS_VARIABLE, "").strip().lower()
    if not threads and (wanted == "all" or os.environ.get("OMP_NUM_THREADS")):
        return None
    if not threads and wanted.isdigit() and int(wanted) > 0:
        threads = int(wanted)
    n = threads if threads and threads > 0 else free_cores()
    if "torch" not in sys.modules:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(n)
        return n
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # without it the BLAS keeps its own count
        pass
    return n
