"""The writer's map from a path's 128-bit key to where its current row lives.

It is the only per-row state a writer holds (~25 bytes a row, numpy arrays: 250 MB at
10 M rows, never Python objects per row): a commit looks up only the keys it writes,
so its cost does not grow with the cache. New keys go to a small dict and are merged into
the sorted arrays in bulk (a linear merge of two sorted runs) once the dict grows.
"""
from __future__ import annotations

import numpy as np

Key = tuple[int, int]


class KeyIndex:
    """key (hi, lo uint64) -> (part uid int32, row int64), for live rows only (one per key)."""

    def __init__(self) -> None:
        self.hi = np.zeros(0, np.uint64)  # sorted
        self.lo = np.zeros(0, np.uint64)
        self.uid = np.zeros(0, np.int32)
        self.row = np.zeros(0, np.int64)
        self.alive = np.zeros(0, bool)
        self.delta: dict[Key, tuple[int, int]] = {}
        self._dead = 0

    @classmethod
    def build(cls, keys: np.ndarray, uid: np.ndarray, row: np.ndarray) -> KeyIndex:
        index = cls()
        order = np.argsort(keys[:, 0], kind="stable")
        index.hi, index.lo = keys[order, 0].copy(), keys[order, 1].copy()
        index.uid, index.row = np.asarray(uid, np.int32)[order], np.asarray(row, np.int64)[order]
        index.alive = np.ones(len(order), bool)
        return index

    def __len__(self) -> int:
        return len(self.hi) - self._dead + len(self.delta)

    def _base_positions(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key's live entry in the sorted arrays, or -1."""
        out = np.full(len(keys), -1, np.int64)
        if not len(self.hi) or not len(keys):
            return out
        left = np.searchsorted(self.hi, keys[:, 0], "left")
        right = np.searchsorted(self.hi, keys[:, 0], "right")
        one = right - left == 1
        p = left[one]
        ok = (self.lo[p] == keys[one, 1]) & self.alive[p]
        out[np.flatnonzero(one)[ok]] = p[ok]
        for j in np.flatnonzero(right - left > 1):  # several entries share the high half (dead ones, or a 64-bit collision)
            for p in range(left[j], right[j]):
                if self.lo[p] == keys[j, 1] and self.alive[p]:
                    out[j] = p
        return out

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uid, row) of each key's live row; uid -1 where the key has none."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        uid, row = np.full(len(keys), -1, np.int32), np.full(len(keys), -1, np.int64)
        pos = self._base_positions(keys)
        hit = pos >= 0
        uid[hit], row[hit] = self.uid[pos[hit]], self.row[pos[hit]]
        if self.delta:
            for j, (h, lo) in enumerate(keys.tolist()):
                found = self.delta.get((h, lo))
                if found is not None:
                    uid[j], row[j] = found
        return uid, row

    def delete(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        if self.delta:
            for h, lo in keys.tolist():
                self.delta.pop((h, lo), None)
        pos = self._base_positions(keys)
        pos = pos[pos >= 0]
        self.alive[pos] = False
        self._dead += len(pos)

    def insert(self, keys: np.ndarray, uid: int, rows: np.ndarray) -> None:
        """Add live entries (the caller deleted any earlier entry of these keys)."""
        for (h, lo), r in zip(np.asarray(keys, np.uint64).reshape(-1, 2).tolist(), np.asarray(rows).tolist()):
            self.delta[(h, lo)] = (uid, r)
        if len(self.delta) > max(1 << 16, min(len(self.hi) // 8, 1 << 18)):  # a dict entry costs ~150 bytes: keep it small
            self._merge_delta()

    def move(self, keys: np.ndarray, uid: int, rows: np.ndarray) -> None:
        """Rows that a merge copied to part ``uid``: point their keys there."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        rows = np.asarray(rows, np.int64)
        pos = self._base_positions(keys)
        hit = pos >= 0
        self.uid[pos[hit]], self.row[pos[hit]] = uid, rows[hit]
        if self.delta:
            for j in np.flatnonzero(~hit).tolist():
                k = (int(keys[j, 0]), int(keys[j, 1]))
                if k in self.delta:
                    self.delta[k] = (uid, int(rows[j]))

    def _merge_delta(self) -> None:
        """Fold the dict into the sorted arrays (dead entries dropped), one array at a time to
        keep the peak near twice the index's size."""
        items = list(self.delta.items())
        dk = np.array([k for k, _ in items], dtype=np.uint64).reshape(-1, 2)
        dv = np.array([v for _, v in items], dtype=np.int64).reshape(-1, 2)
        self.delta = {}
        first = np.argsort(dk[:, 0], kind="stable")
        live = self.alive
        merged = np.argsort(np.concatenate([self.hi[live], dk[first, 0]]), kind="stable")  # two sorted runs: a linear merge
        self.hi = np.concatenate([self.hi[live], dk[first, 0]])[merged]
        self.lo = np.concatenate([self.lo[live], dk[first, 1]])[merged]
        self.uid = np.concatenate([self.uid[live], dv[first, 0].astype(np.int32)])[merged]
        self.row = np.concatenate([self.row[live], dv[first, 1]])[merged]
        self.alive = np.ones(len(self.hi), bool)
        self._dead = 0

    def entries_in(self, uid: int) -> int:
        """How many live entries point into part ``uid`` (for checks and tests)."""
        return int(((self.uid == uid) & self.alive).sum()) + sum(1 for u, _ in self.delta.values() if u == uid)
