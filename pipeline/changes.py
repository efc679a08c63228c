"""Which files the quick check calls unchanged although their bytes changed since their rows were written.

The quick check is rsync's: a file whose size and mtime equal its row's is unchanged, and is
not read. Two things defeat it:

* tools that restore mtimes (``touch -r``, ``cp -p``, ``rsync -t``, ``tar x``) after changing a
  file's bytes but not its size. Only reading the bytes sees that: ``extract --verify-content``
  hashes every such file and compares it with the SHA-256 its row recorded.
* a file rewritten right after it was hashed, within the file system's mtime granularity (FAT
  2 s, ext3 1 s, ext4 a clock tick): same size, same mtime. Git calls these index entries
  "racy" and re-hashes them; so do we. A row whose file's mtime is not older than the moment
  it was hashed minus ``RACY_SECONDS`` is hashed again by the next run.

"The moment it was hashed" must be a lower bound, or the rule misses rows: a part's commit
time is an upper bound (rows are hashed up to ``--commit-seconds`` before it, and a merge
rewrites it later still). So every run records when it began scanning (``SCAN_STARTED`` in
the cache's provenance, with its commits): every row it writes was hashed after that, and
every row it flags is hashed again before its first commit. Rows it does not flag have
mtimes more than ``RACY_SECONDS`` older than their hash and are safe until their mtime
changes. A run that commits nothing leaves the old time, so its flagged rows are checked
again next time (a few files written just before a run, not the collection). Caches written
before this rule recorded no time: their first run under it flags nothing; run it once with
``--verify-content`` to close that gap.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import ImageRecord, content_digests
from .store import read_rows

RACY_SECONDS = 2.0  # the coarsest mtime granularity in common use (FAT); ext3 is 1 s
SCAN_STARTED = "scan_started"  # provenance key: when the run that last committed began scanning (seconds since the epoch)


@dataclass
class ContentCheck:
    """What hashing the candidates of one cache found."""

    changed: np.ndarray  # indices (into the scan's records) of rows whose file's bytes differ from the recorded SHA-256
    hashed: int  # files read and hashed for this cache


def racy(mtime_ns: np.ndarray, scan_started: float | None) -> np.ndarray:
    """Mask of files whose mtime is not older than ``scan_started`` (the last committing run's
    scan start, a lower bound of when their rows were hashed) minus ``RACY_SECONDS``."""
    if scan_started is None:
        return np.zeros(len(mtime_ns), bool)
    return np.asarray(mtime_ns, np.int64) >= int((float(scan_started) - RACY_SECONDS) * 1e9)


def check_content(cache: Path, root: Path, records: Sequence[ImageRecord], paths: np.ndarray, candidates: np.ndarray,
                  digests: dict[str, bytes | None]) -> ContentCheck:
    """Hash the files at ``candidates`` (indices into ``records``, ``paths`` their encoded
    paths) that are rows of ``cache`` and compare each with its row's SHA-256. A file that
    cannot be read now, or whose row recorded no hash, counts as changed: it is extracted
    again (and fails there with its reason). ``digests`` (relpath -> SHA-256) is shared by the
    caches of one run, so a file is read once however many backbones check it."""
    candidates = np.asarray(candidates, np.intp)
    if not len(candidates):
        return ContentCheck(candidates, 0)
    with read_rows(cache) as table:
        if not len(table):
            return ContentCheck(candidates[:0], 0)
        want = paths[candidates]
        pos = np.minimum(np.searchsorted(table.paths_raw, want), len(table) - 1)
        found = table.paths_raw[pos] == want  # recorded failures are not rows: nothing to compare
        idx, recorded = candidates[found], table.fingerprints["sha256"][pos[found]]
    unread = [records[i] for i in idx.tolist() if records[i].relpath not in digests]
    digests.update(zip((r.relpath for r in unread), content_digests(root, unread)))
    changed = [k for k, i in enumerate(idx.tolist())
               if digests[records[i].relpath] is None or not recorded[k].any() or digests[records[i].relpath] != recorded[k].tobytes()]
    return ContentCheck(idx[changed], len(idx))
