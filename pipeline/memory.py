"""``--memory-budget``: how much memory a command that reads a cache may give its rows.

One meaning in every command (fit-head, evaluate, predict --cache, compare, audit, report):
the bytes of rows (the embeddings and the working copies the command makes of them) held at
once. Under it a command reads what it needs into memory; over it the command streams the
cache in chunks sized from the budget, and says so. The default, ``auto``, is a quarter of the
memory available when the command starts (``MemAvailable``, or what is left under the
cgroup's limit when that is lower): on a shared machine the other processes keep the rest.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import UsageError

logger = logging.getLogger(__name__)

AUTO = "auto"
AUTO_SHARE = 0.25  # of the available memory
FLOOR = 64 << 20  # ``auto`` never below this (a machine with almost nothing free still reads in chunks of some size)
_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(text: str | float, option: str = "--memory-budget") -> int:
    """``"1GiB"``, ``"512MiB"``, ``"1.5G"``, ``"800MB"`` or a bare number of GiB -> bytes.

    Raises:
        UsageError: not a size, or not more than 0.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    m = _SIZE.match(str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise UsageError(f"{option} {text!r}: give a size such as 2GiB, 512MiB or 1.5 (GiB), or auto")
    number = float(m.group(1)) * _UNITS[m.group(2)]
    if not number < 2**62:
        raise UsageError(f"{option} {text!r}: too large; give a size such as 2GiB, or auto")
    value = int(number)
    if value <= 0:
        raise UsageError(f"{option} {text!r}: must be more than 0 bytes")
    return value


def check_budget(text: str | float, option: str = "--memory-budget") -> str:
    """The option's canonical text (``auto`` or the size as given); UsageError when it is neither."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    parse_size(text, option)
    return text if isinstance(text, str) else repr(float(text))


def available_bytes() -> int:
    """Memory a new allocation can get without swapping: ``MemAvailable``, capped by what the
    cgroup (v2 or v1) still allows this process's group."""
    available = _meminfo_available()
    limit, used = _cgroup_limit_and_usage()
    if limit is not None and used is not None:
        available = min(available, max(0, limit - used))
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit_and_usage() -> tuple[int | None, int | None]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge number: no limit
            return int(limit), usage
    return None, None


def budget_bytes(text: str | float = AUTO) -> int:
    """The budget in bytes: ``auto`` is ``AUTO_SHARE`` of ``available_bytes()`` (at least ``FLOOR``)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return max(FLOOR, int(available_bytes() * AUTO_SHARE))
    return parse_size(text)


def human(n: float) -> str:
    """``1536 MiB`` -> ``1.5 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def say_streaming(command: str, need: int, budget: int, how: str) -> None:
    """The one line every command prints when it streams: what it would need, its budget, what it does instead."""
    logger.info(f"{command}: the rows need {human(need)} in memory, over --memory-budget {human(budget)}; {how}")


def chunk_bytes(budget: int) -> int:
    """Bytes of rows one streamed chunk holds: an eighth of the budget (the chunk's working
    copies fit beside it), between 1 MiB and 512 MiB (larger chunks read no faster)."""
    return int(min(512 << 20, max(1 << 20, budget // 8)))


def rows_per_chunk(budget: int, row_bytes: int, least: int = 256) -> int:
    """Rows of ``row_bytes`` (a row and its working copies) in one chunk of ``chunk_bytes(budget)``."""
    return max(least, chunk_bytes(budget) // max(1, row_bytes))


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks for reuse, and after a large block is freed it raises its mmap
    threshold, so the next ones come from the heap too: a process that read a cache in 25 MB
    blocks kept 648 MiB resident for 1 M rows written (76 MiB after a trim). A streamed
    command calls this between its stages, so its resident memory is what it holds."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


WORKING_FLOOR = 64 << 20  # what a command keeps for its rows however much per-row metadata it holds


def working_budget(budget: int, held: int) -> int:
    """What is left of ``budget`` for the rows and their working copies once ``held`` bytes of
    per-row metadata (a cache's table: paths, labels, splits, hashes, ~130 bytes a row, 1.3 GB
    at 10 M rows) are counted, at least ``WORKING_FLOOR`` (or the budget itself, when smaller):
    the budget bounds everything that grows with the cache, so a 10 M-row command under 1 GiB
    stays near 1 GiB beyond its imports."""
    return max(min(int(budget), WORKING_FLOOR), int(budget) - int(held))
