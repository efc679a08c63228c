"""What a writer knows of the cache's live entries: per listed part, which rows and failure
records are deleted (from the tombstones), and, once a commit needs it, a key index over
every live row and a map of every live failure record.

The writer (``writer.py``) changes this state only after the change is durable (the
manifest replaced); maintenance (``maintenance.py``) does the same for adoption, merges
and repair's dedupe. Parts get small integer ids (``uid``) so the index stores no names.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .columns import FailureColumns, Tombstones
from .keyindex import KeyIndex
from .manifest import Manifest, PartInfo
from .parts import PartFile

FailureEntry = tuple[int, int, str, str, int, int]  # (part uid, row in its part, path, reason, size, mtime_ns)


class PartDeletions:
    """A listed part's stable small id and what is deleted in it."""

    __slots__ = ("uid", "del_rows", "del_fails")

    def __init__(self, uid: int):
        self.uid = uid
        self.del_rows: list[np.ndarray] = []
        self.del_fails: list[np.ndarray] = []

    def masks(self, info: PartInfo) -> tuple[np.ndarray, np.ndarray]:
        """(deleted rows, deleted failure records) of ``info`` as boolean masks."""
        rows, fails = np.zeros(info.rows, bool), np.zeros(info.failures, bool)
        for r in self.del_rows:
            rows[r] = True
        for r in self.del_fails:
            fails[r] = True
        return rows, fails


@dataclass
class LiveEntries:
    """One part's live rows and failure records, while the part is open (see :meth:`LiveState.walk`)."""

    position: int  # the part's place in the manifest
    info: PartInfo
    deletions: PartDeletions
    file: PartFile
    rows: np.ndarray  # indices of live rows
    failures: np.ndarray  # indices of live failure records


def add_deleted_counts(manifest: Manifest, tomb: Tombstones) -> None:
    """Count ``tomb``'s deletions into the manifest's per-part totals."""
    infos = {p.name: p for p in manifest.parts}
    for target, (rows, fails) in tomb.by_target().items():
        if target in infos:
            infos[target].deleted += len(rows)
            infos[target].failures_deleted += len(fails)


class LiveState:
    """Deletions per listed part, the key index and the live failure records of one cache."""

    def __init__(self, path: Path, parts_dir: Path):
        self.path, self.parts_dir = path, parts_dir
        self.parts: dict[str, PartDeletions] = {}
        self.index: KeyIndex | None = None
        self.failures: dict[tuple[int, int], FailureEntry] | None = None  # key -> entry
        self.loaded = False
        self._next_uid = 0

    def add_part(self, name: str) -> PartDeletions:
        """A newly listed part, nothing deleted in it yet."""
        self._next_uid += 1
        st = self.parts[name] = PartDeletions(self._next_uid)
        return st

    def forget(self) -> None:
        """Drop everything; the next use reads it again from the parts."""
        self.parts, self.index, self.failures, self.loaded = {}, None, None, False

    def open_part(self, info: PartInfo) -> PartFile:
        return PartFile(self.path, self.parts_dir, info.name, info)

    # ------------------------------------------------------------------ reading it

    def load(self, manifest: Manifest) -> None:
        """Deletions of every listed part, from their tombstones (once); the manifest's
        per-part counts are set from them (the tombstones are the truth)."""
        if self.loaded:
            return
        self.parts = {}
        for p in manifest.parts:
            self.add_part(p.name)
        for p in manifest.parts:
            if not p.tombstones:
                continue
            pf = self.open_part(p)
            try:
                self.apply_deletions(pf.tombstones())
            finally:
                pf.close()
        self.recount(manifest)
        self.loaded = True

    def walk(self, manifest: Manifest) -> Iterator[LiveEntries]:
        """Every listed part that holds rows or failure records, open while the caller looks."""
        self.load(manifest)
        for i, p in enumerate(manifest.parts):
            if not (p.rows or p.failures):
                continue
            st = self.parts[p.name]
            rmask, fmask = st.masks(p)
            pf = self.open_part(p)
            try:
                yield LiveEntries(i, p, st, pf, np.flatnonzero(~rmask), np.flatnonzero(~fmask))
            finally:
                pf.close()

    def ensure_index(self, manifest: Manifest) -> None:
        """The key index over every live row and failure record (built on the first commit)."""
        self.load(manifest)
        if self.index is not None:
            return
        keys, uids, rows = [], [], []
        self.failures = {}
        for live in self.walk(manifest):
            if live.info.rows:
                keys.append(live.file.column("keys")[live.rows])
                uids.append(np.full(len(live.rows), live.deletions.uid, np.int32))
                rows.append(live.rows)
            if live.info.failures:
                self.record_failures(live.deletions.uid, live.file.failures(), live.failures)
        self.index = KeyIndex.build(np.concatenate(keys), np.concatenate(uids), np.concatenate(rows)) if keys else KeyIndex()

    def supersede(self, keys: np.ndarray) -> tuple[list[tuple[str, int, int]], np.ndarray, list[tuple[int, int]]]:
        """Tombstones for the live rows and failure records of ``keys``: (triples, row-hit keys, failure-hit keys)."""
        uid, row = self.index.lookup(keys)
        hit = uid >= 0
        names = {st.uid: name for name, st in self.parts.items()}
        triples = [(names[u], Tombstones.ROW, r) for u, r in zip(uid[hit].tolist(), row[hit].tolist())]
        fail_hits = []
        if self.failures:
            for h, lo in keys.tolist():
                found = self.failures.get((h, lo))
                if found is not None:
                    triples.append((names[found[0]], Tombstones.FAILURE, found[1]))
                    fail_hits.append((h, lo))
        return triples, keys[hit], fail_hits

    # ------------------------------------------------------------------ changing it (after the change is durable)

    def apply_deletions(self, tomb: Tombstones) -> None:
        for target, (rows, fails) in tomb.by_target().items():
            st = self.parts.get(target)
            if st is not None:
                st.del_rows.append(rows)
                st.del_fails.append(fails)

    def recount(self, manifest: Manifest) -> None:
        """The manifest's per-part deletion counts from the deletions known here."""
        for p in manifest.parts:
            st = self.parts.get(p.name)
            if st is not None:
                rmask, fmask = st.masks(p)
                p.deleted, p.failures_deleted = int(rmask.sum()), int(fmask.sum())

    def record_failures(self, uid: int, fails: FailureColumns, which: np.ndarray | None = None) -> None:
        """Failure records ``which`` (default: all) of the part ``uid`` are live."""
        items = fails.items()
        for j in (range(len(fails)) if which is None else which.tolist()):
            self.failures[(int(fails.keys[j, 0]), int(fails.keys[j, 1]))] = (uid, j, *items[j])

    def add_rows(self, name: str, keys: np.ndarray, fails: FailureColumns, row_hits: np.ndarray, fail_hits: list[tuple[int, int]]) -> None:
        """A new part ``name`` listed with rows of ``keys`` and ``fails``, replacing the index
        entries ``row_hits`` and failure records ``fail_hits`` it superseded."""
        st = self.add_part(name)
        if self.index is None:
            return
        self.index.delete(row_hits)
        self.index.insert(keys, st.uid, np.arange(len(keys)))
        for k in fail_hits:
            self.failures.pop(k, None)
        self.record_failures(st.uid, fails)

    def forget_targets(self, manifest: Manifest, tomb: Tombstones) -> None:
        """Apply tombstones found in a part being adopted to the deletions and the index."""
        if not len(tomb):
            return
        self.apply_deletions(tomb)
        infos = {p.name: p for p in manifest.parts}
        for target, (rows, fails) in tomb.by_target().items():
            if target not in infos:
                continue
            pf = self.open_part(infos[target])
            try:
                if len(rows):
                    keys = pf.column("keys")[np.unique(rows)]
                    uid, row = self.index.lookup(keys)
                    self.index.delete(keys[(uid == self.parts[target].uid) & np.isin(row, rows)])
                if len(fails):
                    for h, lo in pf.failures().keys[np.unique(fails)].tolist():
                        self.failures.pop((h, lo), None)
            finally:
                pf.close()

    def replace_parts(self, merged: list[str], info: PartInfo | None, failures: FailureColumns) -> None:
        """After a merge: ``merged`` are gone; the index points into ``info`` (None: nothing was live)."""
        old_uids = {self.parts.pop(n).uid for n in merged}
        if info is not None:
            st = self.add_part(info.name)
            if self.index is not None:
                pf = self.open_part(info)
                try:
                    step = 1 << 20
                    for a in range(0, info.rows, step):
                        keys = pf.column("keys", slice(a, a + step))
                        self.index.move(keys, st.uid, np.arange(a, a + len(keys)))
                finally:
                    pf.close()
                self.record_failures(st.uid, failures)
        elif self.failures is not None:
            self.failures = {k: v for k, v in self.failures.items() if v[0] not in old_uids}
