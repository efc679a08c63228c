"""What a cache already holds, as the incremental diff of ``extract`` needs it: every current
row's and recorded failure's path with its file fingerprint, compared with a folder scan in
numpy (sorted byte strings and ``searchsorted``) rather than a dict of Python strings."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .columns import encode_paths


@dataclass
class KnownFiles:
    paths: np.ndarray  # S, sorted, unique
    size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64

    @classmethod
    def build(cls, paths: np.ndarray, size: np.ndarray, mtime_ns: np.ndarray) -> KnownFiles:
        order = np.argsort(paths, kind="stable")
        return cls(paths[order], np.asarray(size, np.int64)[order], np.asarray(mtime_ns, np.int64)[order])

    def __len__(self) -> int:
        return len(self.paths)

    def _find(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.paths, paths)
        pos_c = np.minimum(pos, max(len(self.paths) - 1, 0))
        found = (pos < len(self.paths)) & (self.paths[pos_c] == paths) if len(self.paths) else np.zeros(len(paths), bool)
        return pos_c, found

    def unchanged(self, paths: np.ndarray, size: np.ndarray, mtime_ns: np.ndarray) -> np.ndarray:
        """Mask of files (encoded paths with their fingerprints) the cache holds as they are now."""
        pos, found = self._find(paths)
        if not len(self.paths):
            return found
        return found & (self.size[pos] == size) & (self.mtime_ns[pos] == mtime_ns)

    def missing_from(self, paths: np.ndarray) -> list[str]:
        """Known paths that are not among ``paths`` (files gone from the folder)."""
        gone = ~np.isin(self.paths, paths)
        return [p.decode("utf-8", "surrogateescape") for p in self.paths[gone].tolist()]

    def as_dict(self) -> dict[str, tuple[int, int]]:
        return {p.decode("utf-8", "surrogateescape"): (int(s), int(m)) for p, s, m in zip(self.paths.tolist(), self.size.tolist(), self.mtime_ns.tolist())}


def known_files(rows: tuple[np.ndarray, np.ndarray, np.ndarray], failures: Iterable[tuple[str, str, int, int]],
                retry: Callable[[str], bool]) -> KnownFiles:
    """Rows and failures (both count as done), except failures ``retry`` says a changed setting may cure."""
    kept = [(p, s, m) for p, reason, s, m in failures if not retry(reason)]
    fpaths = encode_paths([p for p, _, _ in kept])
    width = max(rows[0].dtype.itemsize, fpaths.dtype.itemsize, 1)
    paths = np.concatenate([rows[0].astype(f"S{width}"), fpaths.astype(f"S{width}")])
    size = np.concatenate([rows[1], np.array([s for _, s, _ in kept], np.int64)])
    mtime = np.concatenate([rows[2], np.array([m for _, _, m in kept], np.int64)])
    return KnownFiles.build(paths, size, mtime)


def read_known_files(path: Path, retry: Callable[[str], bool]) -> KnownFiles:
    """:func:`known_files` of the cache at ``path`` as committed (none when there is no cache yet)."""
    from .snapshot import open_snapshot

    if not path.exists():
        return known_files((np.zeros(0, "S1"), np.zeros(0, np.int64), np.zeros(0, np.int64)), [], retry)
    snap = open_snapshot(path)
    try:
        view = snap.live_columns(fields=("paths", "size", "mtime_ns"))
        return known_files((view.paths_raw, view.size, view.mtime_ns), snap.failure_columns().items(), retry)
    finally:
        snap.close()
