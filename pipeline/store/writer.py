"""Writing the embedding cache: commits of constant cost, tombstones, adoption, compaction.

A cache ``X.h5`` is a manifest plus ``X.h5.parts/`` (see ``manifest.py``, ``parts.py``).
A **commit** writes one new part (the buffered rows, the files that failed, and tombstones
for the older rows and failure records it replaces or deletes), then atomically replaces
the manifest. Its cost depends on the rows committed and the number of parts, never on the
cache's size: the writer finds the rows a commit replaces through its key index
(``keyindex.py``), never by reading or rewriting the cache.

A writer killed at any moment loses only what it had not committed: a part written but not
yet named by the manifest is *adopted* by the next writer when it was written against the
current manifest (a commit, or a torchrun rank's staged part) and deleted otherwise (a
merge whose inputs still hold its rows). Parts that compaction retired are deleted once no
live reader needs them (``leases.py``).

Public API: :class:`CacheWriter` and :class:`PendingRow` (see the README's "Writing a cache
from your own code"); :func:`new_cache_meta` builds the provenance a new cache needs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import DTYPES
from ..errors import CacheError
from .atomic import remove_stale_temporaries
from .columns import FailureColumns, RowColumns, Tombstones, encode_paths, path_keys
from .compaction import CompactionPolicy, plan_merges
from .keyindex import KeyIndex
from .known import KnownFiles, known_files
from .leases import live_pins, needed_by_readers
from .locks import WriterLock
from .manifest import Manifest, PartInfo, read_manifest, write_manifest
from .parts import ADOPTABLE, PartFile, PartSink, entry_for, new_part_name, peek_part, row_bytes, write_part
from .schema import SCHEMA_VERSION, check_compatible, open_cache_file, parts_dir_for, same_backbone_rows
from .snapshot import _remap_labels, open_snapshot


@dataclass
class PendingRow:
    """One embedded file: its path relative to the data root (``/``-separated), label (index
    into the writer's ``meta['classes']``, -1 = unlabeled), split (``""``, ``train``, ``val``
    or ``test``), file size and mtime (for incremental runs) and SHA-256 (hex, or ``""``)."""

    relpath: str
    label: int = -1
    split: str = ""
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""


def new_cache_meta(model: str, embed_dim: int, classes: Sequence[str] = (), *, weights: str = "custom", preprocessing: Any = None,
                   dtype: str = "float32", data_root: str = "", layout: str = "flat", **extra: Any) -> dict[str, Any]:
    """The provenance a new cache needs, for rows computed by your own code (``extract`` fills
    it from the backbone). Rows of another model, weights, preprocessing or data root are
    refused by an existing cache."""
    return {"model": model, "weights": weights, "preprocessing": preprocessing if preprocessing is not None else {}, "embed_dim": int(embed_dim),
            "dtype": dtype, "data_root": str(data_root), "layout": layout, "classes": list(classes), **extra}


@dataclass
class WriterStats:
    """Where a writer's time went (the benchmark reads these)."""

    commits: int = 0
    commit_seconds: float = 0.0
    last_commit_seconds: float = 0.0
    merges: int = 0
    merge_seconds: float = 0.0
    merged_rows: int = 0
    largest_merge_seconds: float = 0.0


class _Part:
    """The writer's view of a listed part: a stable small id and what is deleted in it."""

    __slots__ = ("uid", "del_rows", "del_fails")

    def __init__(self, uid: int):
        self.uid = uid
        self.del_rows: list[np.ndarray] = []
        self.del_fails: list[np.ndarray] = []

    def masks(self, info: PartInfo) -> tuple[np.ndarray, np.ndarray]:
        rows, fails = np.zeros(info.rows, bool), np.zeros(info.failures, bool)
        for r in self.del_rows:
            rows[r] = True
        for r in self.del_fails:
            fails[r] = True
        return rows, fails


class CacheWriter:
    """Buffers rows and commits them as parts (the caller holds the cache's :class:`WriterLock`,
    or uses :meth:`CacheWriter.open`, which takes it).

    ``meta`` is the provenance of this run; it must match an existing cache's (``COMPAT_KEYS``).
    ``meta['classes']`` may differ: labels of older rows are mapped by class name. Opening a
    schema-1 cache migrates it to schema 2 first.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], staging: bool = False, tag: str = "", policy: CompactionPolicy | None = None):
        """``staging=True``: write parts only, never the manifest, and leave other parts alone —
        for torchrun ranks, whose parts the lock holder adopts at the end (by opening a normal
        writer). ``tag`` goes into part names (e.g. ``rank1-``)."""
        self.path = Path(path)
        self.parts_dir = parts_dir_for(self.path)
        self.staging, self.tag = staging, tag
        self.policy = policy or CompactionPolicy()
        self.stats = WriterStats()
        self.adopted = 0
        self.staged: list[str] = []
        if meta.get("dtype") not in DTYPES:
            raise CacheError(f"--dtype {meta.get('dtype')!r} is not supported; choose one of {', '.join(DTYPES)}")
        if "embed_dim" not in meta or "classes" not in meta:
            raise CacheError("cache provenance needs at least model, embed_dim and classes; build it with new_cache_meta()")
        self._new_meta = dict(meta)
        if self.path.exists():
            _, version = _close_and_version(self.path)
            if version < SCHEMA_VERSION:
                if staging:
                    raise CacheError(f"cache {str(self.path)!r} uses schema {version}; open it once without torchrun to migrate it")
                from .migrate import migrate_v1

                migrate_v1(self.path, meta)
            self.manifest = read_manifest(self.path)
            check_compatible(self.path, self.manifest.meta, meta)
        else:
            self.manifest = Manifest(dict(meta))
        self._parts: dict[str, _Part] = {}
        self._next_uid = 0
        self._loaded = False
        self._index: KeyIndex | None = None
        self._failures: dict[tuple[int, int], tuple[int, int, str, str, int, int]] | None = None  # key -> (uid, row, path, reason, size, mtime)
        self._garbage_dirty = False
        self._clear_buffer()
        if not staging and (self.path.exists() or self.parts_dir.is_dir()):
            self._housekeeping()  # also when a writer died before its first manifest: its temporaries and parts

    @classmethod
    @contextmanager
    def open(cls, path: str | Path, meta: dict[str, Any], *, wait: float = 0.0, command: str = "CacheWriter") -> Iterator[CacheWriter]:
        """``with CacheWriter.open(path, meta) as w: w.add(...)`` — takes the cache's writer lock
        (``wait`` seconds for another writer), commits and compacts on a clean exit."""
        with WriterLock(Path(path), command=command, wait=wait):
            writer = cls(path, meta)
            yield writer
            writer.commit()
            writer.compact()
            writer.close()

    # ------------------------------------------------------------------ state

    def _clear_buffer(self) -> None:
        self._rows: list[RowColumns] = []
        self._emb: list[np.ndarray] = []
        self._row_seq: list[np.ndarray] = []
        self._fail: dict[str, tuple[str, int, int, int]] = {}  # path -> (reason, size, mtime, seq)
        self._removed: dict[str, int] = {}  # path -> seq
        self._seq = 0
        self._pending_rows = 0

    def _new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid

    def _load(self) -> None:
        """Deletions of every listed part, from their tombstones (once per writer)."""
        if self._loaded:
            return
        self._parts = {p.name: _Part(self._new_uid()) for p in self.manifest.parts}
        listed = self._parts
        for p in self.manifest.parts:
            if not p.tombstones:
                continue
            pf = PartFile(self.path, self.parts_dir, p.name, p)
            try:
                for target, (rows, fails) in pf.tombstones().by_target().items():
                    if target in listed:
                        listed[target].del_rows.append(rows)
                        listed[target].del_fails.append(fails)
            finally:
                pf.close()
        infos = {p.name: p for p in self.manifest.parts}
        for name, st in self._parts.items():  # the tombstones are the truth; the manifest's counts follow them
            rmask, fmask = st.masks(infos[name])
            infos[name].deleted, infos[name].failures_deleted = int(rmask.sum()), int(fmask.sum())
        self._loaded = True

    def _ensure_index(self) -> None:
        """The key index over every live row and failure record (built on the first commit)."""
        self._load()
        if self._index is not None:
            return
        keys, uids, rows = [], [], []
        failures: dict[tuple[int, int], tuple[int, int, str, str, int, int]] = {}
        for p in self.manifest.parts:
            st = self._parts[p.name]
            if not (p.rows or p.failures):
                continue
            pf = PartFile(self.path, self.parts_dir, p.name, p)
            try:
                rmask, fmask = st.masks(p)
                if p.rows:
                    live = np.flatnonzero(~rmask)
                    keys.append(pf.column("keys")[live])
                    uids.append(np.full(len(live), st.uid, np.int32))
                    rows.append(live)
                if p.failures:
                    fc = pf.failures()
                    items = fc.items()
                    for j in np.flatnonzero(~fmask).tolist():
                        failures[(int(fc.keys[j, 0]), int(fc.keys[j, 1]))] = (st.uid, j, *items[j])
            finally:
                pf.close()
        if keys:
            self._index = KeyIndex.build(np.concatenate(keys), np.concatenate(uids), np.concatenate(rows))
        else:
            self._index = KeyIndex()
        self._failures = failures

    # ------------------------------------------------------------------ what is there

    def known_files(self, retry: Callable[[str], bool] = lambda reason: False) -> KnownFiles:
        """Every current row's and failure's path and fingerprint (both count as done), except
        failures whose reason ``retry`` says a changed setting may cure."""
        if not self.path.exists():
            return known_files((np.zeros(0, "S1"), np.zeros(0, np.int64), np.zeros(0, np.int64)), [], retry)
        snap = open_snapshot(self.path)
        try:
            view = snap.live_columns(fields=("paths", "size", "mtime_ns"))
            return known_files((view.paths_raw, view.size, view.mtime_ns), snap.failure_columns().items(), retry)
        finally:
            snap.close()

    def known(self, retry: Callable[[str], bool] = lambda reason: False) -> dict[str, tuple[int, int]]:
        """relpath -> (size, mtime_ns); see :meth:`known_files` (which avoids a dict per row)."""
        return self.known_files(retry).as_dict()

    @property
    def failures(self) -> dict[str, str]:
        """Files currently failing (committed and buffered), path -> reason."""
        if self._failures is not None:
            merged = {path: reason for _, _, path, reason, _, _ in self._failures.values()}
        elif self.path.exists():
            snap = open_snapshot(self.path)
            try:
                merged = {p: r for p, r, _, _ in snap.failure_columns().items()}
            finally:
                snap.close()
        else:
            merged = {}
        merged.update({p: r for p, (r, _, _, _) in self._fail.items()})
        for p in self._removed:
            merged.pop(p, None)
        return merged

    @property
    def n_rows(self) -> int:
        """Rows the cache holds as committed (live rows of every listed part)."""
        return self.manifest.live_rows()

    @property
    def pending(self) -> int:
        return self._pending_rows

    @property
    def commits(self) -> int:
        return self.stats.commits

    # ------------------------------------------------------------------ changes

    def add(self, rows: Sequence[PendingRow], embeddings: np.ndarray) -> None:
        """Buffer rows (committed by the next :meth:`commit`); a later row for a path replaces an earlier one."""
        if len(rows) != len(embeddings):
            raise ValueError(f"{len(rows)} rows and {len(embeddings)} embeddings differ in length")
        if len(rows):
            self.add_columns([r.relpath for r in rows], embeddings, labels=[r.label for r in rows], split=[r.split for r in rows],
                             size=[r.size for r in rows], mtime_ns=[r.mtime_ns for r in rows], sha256=[r.sha256 for r in rows])

    def add_columns(self, paths: Sequence[str] | np.ndarray, embeddings: np.ndarray, *, labels=None, split=None, size=None, mtime_ns=None,
                    sha256=None) -> None:
        """Buffer many rows given as arrays (no Python object per row). ``paths`` may be ``str``
        or UTF-8 bytes; ``sha256`` hex strings or ``[n, 32]`` uint8; missing columns get neutral values."""
        cols = RowColumns.build(paths, labels, split, size, mtime_ns, sha256)
        emb = np.asarray(embeddings, dtype=self._new_meta["dtype"])
        dim = int(self._new_meta["embed_dim"])
        if emb.shape != (len(cols), dim):
            raise ValueError(f"embeddings have shape {emb.shape}; this cache needs ({len(cols)}, {dim})")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or inf; they would poison every head fitted on this cache")
        n_classes = len(self._new_meta["classes"])
        if len(cols) and (cols.labels.min() < -1 or cols.labels.max() >= n_classes):
            raise ValueError(f"labels must be -1 (unlabeled) or index one of the {n_classes} classes in meta['classes']")
        if len(cols):
            self._rows.append(cols)
            self._emb.append(emb)
            self._row_seq.append(np.arange(self._seq, self._seq + len(cols)))
            self._seq += len(cols)
            self._pending_rows += len(cols)

    def set_meta(self, **values: Any) -> None:
        """Provenance to record from the next commit on (e.g. the engine that ran)."""
        self._new_meta.update(values)

    def add_failure(self, relpath: str, reason: str, size: int, mtime_ns: int) -> None:
        self._fail[relpath] = (reason, int(size), int(mtime_ns), self._seq)
        self._seq += 1

    def remove(self, relpaths: Sequence[str]) -> None:
        for p in relpaths:
            self._removed[p] = self._seq
            self._seq += 1

    def has_changes(self) -> bool:
        return bool(self._rows or self._fail or self._removed or not self.path.exists() or self._meta_changed())

    def _meta_changed(self) -> bool:
        return self.manifest.meta.get("classes") != self._new_meta.get("classes")

    def _resolve(self, rows_only: bool = False) -> tuple[RowColumns, np.ndarray, FailureColumns, np.ndarray]:
        """The buffer as it should land: for each path only its last change (row, failure or
        removal). Returns (rows, embeddings, failures, keys of every path changed)."""
        rows = RowColumns.concat(self._rows)
        emb = np.concatenate(self._emb) if self._emb else np.zeros((0, int(self._new_meta["embed_dim"])), self._new_meta["dtype"])
        rseq = np.concatenate(self._row_seq) if self._row_seq else np.zeros(0, np.int64)
        fitems = [] if rows_only else list(self._fail.items())
        ritems = [] if rows_only else list(self._removed.items())
        fails = FailureColumns.build([(p, r, s, m) for p, (r, s, m, _) in fitems])
        rkeys = path_keys(encode_paths([p for p, _ in ritems]))
        keys = np.concatenate([rows.keys, fails.keys, rkeys]).reshape(-1, 2)
        seq = np.concatenate([rseq, np.array([q for _, (_, _, _, q) in fitems], np.int64), np.array([q for _, q in ritems], np.int64)])
        kind = np.concatenate([np.zeros(len(rows), np.int8), np.ones(len(fails), np.int8), np.full(len(ritems), 2, np.int8)])
        local = np.concatenate([np.arange(len(rows)), np.arange(len(fails)), np.arange(len(ritems))])
        if not len(keys):
            return rows, emb, fails, keys
        order = np.lexsort((seq, keys[:, 1], keys[:, 0]))
        k = keys[order]
        last = np.ones(len(order), bool)
        last[:-1] = (k[1:] != k[:-1]).any(axis=1)
        win = order[last]
        keep_rows = np.sort(local[win][kind[win] == 0])
        keep_fails = np.sort(local[win][kind[win] == 1])
        return rows.take(keep_rows), emb[keep_rows], fails.take(keep_fails), keys[win]

    def _supersede(self, keys: np.ndarray) -> tuple[list[tuple[str, int, int]], np.ndarray, list[tuple[int, int]]]:
        """Tombstones for the live rows and failure records of ``keys``: (triples, row-hit keys, failure-hit keys)."""
        triples: list[tuple[str, int, int]] = []
        uid, row = self._index.lookup(keys)
        hit = uid >= 0
        names = {st.uid: name for name, st in self._parts.items()}
        triples += [(names[u], Tombstones.ROW, r) for u, r in zip(uid[hit].tolist(), row[hit].tolist())]
        fail_hits = []
        if self._failures:
            for h, lo in keys.tolist():
                found = self._failures.get((h, lo))
                if found is not None:
                    triples.append((names[found[0]], Tombstones.FAILURE, found[1]))
                    fail_hits.append((h, lo))
        return triples, keys[hit], fail_hits

    def _count_deletions(self, m: Manifest, tomb: Tombstones) -> None:
        infos = {p.name: p for p in m.parts}
        for target, (rows, fails) in tomb.by_target().items():
            if target in infos:
                infos[target].deleted += len(rows)
                infos[target].failures_deleted += len(fails)

    def _apply_deletions(self, tomb: Tombstones) -> None:
        for target, (rows, fails) in tomb.by_target().items():
            st = self._parts.get(target)
            if st is not None:
                st.del_rows.append(rows)
                st.del_fails.append(fails)

    # ------------------------------------------------------------------ commits

    def commit(self) -> bool:
        """Make everything buffered durable (one part + one manifest replace), then merge parts
        if a tier filled up. Returns False if there was nothing to do.

        A staging writer writes the part only; failures and removals stay buffered for the
        lock holder (``take_failures``)."""
        if self.staging:
            return self._stage_part()
        if not self.has_changes():
            return False
        t0 = time.perf_counter()
        rows, emb, fails, keys = self._resolve()
        existed = self.path.exists()
        triples: list = []
        row_hits, fail_hits = np.zeros((0, 2), np.uint64), []
        if existed and len(keys):
            self._ensure_index()
            triples, row_hits, fail_hits = self._supersede(keys)
        else:
            self._load()
        tomb = Tombstones.from_triples(triples)
        meta = {**self.manifest.meta, **{k: v for k, v in self._new_meta.items() if k != "created"}}
        meta["classes"] = list(self._new_meta["classes"])
        if existed and not (len(rows) or len(fails) or len(tomb)) and meta == self.manifest.meta:
            self._clear_buffer()  # only removals of paths the cache does not hold
            return False
        new = self.manifest.copy()
        new.meta, new.generation = meta, self.manifest.generation + 1
        info = None
        if len(rows) or len(fails) or len(tomb):
            name = new_part_name(self.tag)
            written = write_part(self.parts_dir, name, rows, emb, meta=meta, base_generation=self.manifest.generation, kind="commit",
                                 failures=fails, tombstones=tomb)
            info = PartInfo.of(written, len(rows), failures=len(fails), tombstones=len(tomb))
            new.parts.append(info)
        self._count_deletions(new, tomb)
        write_manifest(self.path, new)  # the commit point
        # the commit is durable: bring the in-memory state along
        self.manifest, self._garbage_dirty = new, False
        self._apply_deletions(tomb)
        if info is not None:
            st = self._parts[info.name] = _Part(self._new_uid())
            if self._index is not None:
                self._index.delete(row_hits)
                self._index.insert(rows.keys, st.uid, np.arange(len(rows)))
                for k in fail_hits:
                    self._failures.pop(k, None)
                for j, (p, r, s, m) in enumerate(fails.items()):
                    self._failures[(int(fails.keys[j, 0]), int(fails.keys[j, 1]))] = (st.uid, j, p, r, s, m)
        self._clear_buffer()
        spent = time.perf_counter() - t0
        self.stats.commits += 1
        self.stats.commit_seconds += spent
        self.stats.last_commit_seconds = spent
        if self.policy.auto:
            self.compact()
        return True

    def _stage_part(self) -> bool:
        if not self._rows:
            return False
        rows, emb, _, _ = self._resolve(rows_only=True)
        meta = {**self.manifest.meta, **{k: v for k, v in self._new_meta.items() if k != "created"}}
        name = new_part_name(self.tag)
        write_part(self.parts_dir, name, rows, emb, meta=meta, base_generation=self.manifest.generation, kind="stage")
        self.staged.append(name)
        self._rows, self._emb, self._row_seq, self._pending_rows = [], [], [], 0
        self.stats.commits += 1
        return True

    def take_failures(self) -> dict[str, tuple[str, int, int]]:
        """Buffered failures (relpath -> (reason, size, mtime_ns)), handed to the lock holder."""
        out = {p: (r, s, m) for p, (r, s, m, _) in self._fail.items()}
        self._fail = {}
        return out

    def add_failures(self, failures: dict[str, tuple[str, int, int]]) -> None:
        for p, (r, s, m) in failures.items():
            self.add_failure(p, r, s, m)

    def close(self) -> None:
        """Record garbage collected since the last commit (nothing else is pending after a commit)."""
        if self._garbage_dirty and not self.staging and self.path.exists():
            write_manifest(self.path, self.manifest)
            self._garbage_dirty = False

    # ------------------------------------------------------------------ housekeeping

    def _housekeeping(self) -> None:
        """Temporaries of dead writers, retired parts no reader needs, and unlisted parts:
        adopted when written against this manifest by a commit or a rank, deleted otherwise."""
        remove_stale_temporaries(self.path.parent, self.path.name)
        remove_stale_temporaries(self.parts_dir)
        self._collect_garbage()
        if not self.parts_dir.is_dir():
            return
        listed = set(self.manifest.names()) | {name for name, _ in self.manifest.garbage}
        adopt = []
        for entry in sorted(self.parts_dir.glob("part-*.h5")):
            if entry.name in listed:
                continue
            head = peek_part(entry)
            if (head is not None and head["schema_version"] == SCHEMA_VERSION and head["kind"] in ADOPTABLE and head["name"] == entry.name
                    and head["base_generation"] >= self.manifest.generation and same_backbone_rows(head["meta"], self.manifest.meta)):
                adopt.append((head["base_generation"], head["created"], entry.name))
            else:
                entry.unlink(missing_ok=True)
        if adopt:
            self._adopt([name for _, _, name in sorted(adopt)])

    def _collect_garbage(self) -> None:
        if not self.manifest.garbage:
            return
        pins = live_pins(self.parts_dir)
        keep = []
        for name, since in self.manifest.garbage:
            if needed_by_readers(since, pins):
                keep.append((name, since))
            else:
                (self.parts_dir / name).unlink(missing_ok=True)
        if len(keep) != len(self.manifest.garbage):
            self.manifest.garbage = keep
            self._garbage_dirty = True

    def _adopt(self, names: list[str]) -> None:
        """List complete parts whose writer died before listing them: their rows replace older
        rows of the same paths (tombstones in one new part), as a commit of them would have."""
        self._ensure_index()
        before = (self.manifest, self._parts, self._index, self._failures)
        try:
            new = self.manifest.copy()
            triples: list[tuple[str, int, int]] = []
            adopted_rows = 0
            for name in names:
                pf = PartFile(self.path, self.parts_dir, name)
                try:
                    own = pf.tombstones()
                    cols_keys = pf.column("keys")
                    fails = pf.failures()
                    rows = pf.n_rows
                finally:
                    pf.close()
                n_own = len(own)
                self._forget_targets(own.keep_targets(set(self._parts)))  # its own tombstones (a commit's) already apply
                hits, row_hits, fail_hits = self._supersede(np.concatenate([cols_keys, fails.keys]).reshape(-1, 2))
                triples += hits
                self._apply_deletions(Tombstones.from_triples(hits))
                self._index.delete(row_hits)
                for k in fail_hits:
                    self._failures.pop(k, None)
                st = self._parts[name] = _Part(self._new_uid())
                self._index.insert(cols_keys, st.uid, np.arange(rows))
                for j, (p, r, s, m) in enumerate(fails.items()):
                    self._failures[(int(fails.keys[j, 0]), int(fails.keys[j, 1]))] = (st.uid, j, p, r, s, m)
                new.parts.append(entry_for(self.parts_dir / name, rows, len(fails), n_own))
                adopted_rows += rows
            tomb = Tombstones.from_triples(triples)
            if len(tomb):
                name = new_part_name(self.tag)
                written = write_part(self.parts_dir, name, RowColumns.empty(), np.zeros((0, int(new.meta["embed_dim"])), new.meta["dtype"]),
                                     meta=new.meta, base_generation=new.generation, kind="commit", tombstones=tomb)
                new.parts.append(PartInfo.of(written, tombstones=len(tomb)))
                self._parts[name] = _Part(self._new_uid())
            self._recount(new)
            new.generation += 1
            write_manifest(self.path, new)
        except BaseException:
            self.manifest, self._parts, self._index, self._failures = before
            self._loaded, self._index, self._failures = False, None, None
            raise
        self.manifest, self._garbage_dirty = new, False
        self.adopted = adopted_rows

    def _forget_targets(self, tomb: Tombstones) -> None:
        """Apply tombstones found in a part being adopted to the writer's deletions and index."""
        if not len(tomb):
            return
        self._apply_deletions(tomb)
        infos = {p.name: p for p in self.manifest.parts}
        for target, (rows, fails) in tomb.by_target().items():
            if target not in infos:
                continue
            pf = PartFile(self.path, self.parts_dir, target, infos[target])
            try:
                if len(rows):
                    keys = pf.column("keys")[np.unique(rows)]
                    uid, row = self._index.lookup(keys)
                    st = self._parts[target]
                    self._index.delete(keys[(uid == st.uid) & np.isin(row, rows)])
                if len(fails):
                    fkeys = pf.failures().keys[np.unique(fails)]
                    for h, lo in fkeys.tolist():
                        self._failures.pop((h, lo), None)
            finally:
                pf.close()

    def _recount(self, m: Manifest) -> None:
        for p in m.parts:
            st = self._parts.get(p.name)
            if st is not None:
                rmask, fmask = st.masks(p)
                p.deleted, p.failures_deleted = int(rmask.sum()), int(fmask.sum())

    # ------------------------------------------------------------------ compaction

    def compact(self, full: bool = False) -> int:
        """Merge parts as the size-tiered policy says (``full``: everything into one part),
        streaming with a fixed memory budget. Returns how many merges ran."""
        if self.staging or not self.path.exists():
            return 0
        self._load()
        merges = 0
        if full:
            names = self.manifest.names()
            if len(names) > 1 or any(p.deleted or p.failures_deleted for p in self.manifest.parts):
                self._merge(names)
                merges += 1
            return merges
        for _ in range(10_000):
            groups = plan_merges(self.manifest.parts, self.policy)
            if not groups:
                break
            for group in groups:
                self._merge(group)
                merges += 1
        return merges

    def _merge(self, names: Sequence[str]) -> None:
        """Rewrite the live rows, failure records and still-useful tombstones of ``names`` into
        one new part (or none when nothing is live), then retire them. One input is open at a
        time (an open HDF5 file keeps caches of its own), so memory does not grow with the merge."""
        t0 = time.perf_counter()
        m = self.manifest
        group = [n for n in m.names() if n in set(names)]
        gset = set(group)
        infos = {p.name: p for p in m.parts}
        listed = set(m.names())
        dim, dtype = int(m.meta["embed_dim"]), np.dtype(m.meta["dtype"])
        masks = {n: self._parts[n].masks(infos[n]) for n in group}
        open_part = lambda n: PartFile(self.path, self.parts_dir, n, infos[n])  # noqa: E731
        triples, fails, width = [], [], 1
        for n in group:  # first pass: what the inputs carry besides rows
            with _closing(open_part(n)) as pf:
                width = max(width, pf.path_width)
                if infos[n].tombstones:
                    triples += [t for t in pf.tombstones().triples() if t[0] in listed and t[0] not in gset]
                if infos[n].failures:
                    fails.append(pf.failures().take(~masks[n][1]))
        carried, failures = Tombstones.from_triples(triples), FailureColumns.concat(fails)
        n_rows = sum(int((~masks[n][0]).sum()) for n in group)
        info = None
        if n_rows or len(failures) or len(carried):
            name = new_part_name(self.tag + "m")
            sink = PartSink(self.parts_dir, name, n_rows=n_rows, dim=dim, dtype=dtype, path_width=width, meta=m.meta,
                            base_generation=m.generation, kind="merge", failures=failures, tombstones=carried, inputs=group)
            try:
                step = max(256, self.policy.memory_budget // row_bytes(dim, dtype, width))
                for n in group:
                    dead = masks.pop(n)[0]
                    with _closing(open_part(n)) as pf:
                        for a in range(0, infos[n].rows, step):
                            keep = np.flatnonzero(~dead[a : a + step])
                            if not len(keep):
                                continue
                            cols, emb = pf.columns(slice(a, a + step)), pf.embeddings(slice(a, a + step))
                            if len(keep) < len(cols):  # (no copy when nothing in the slice is deleted)
                                cols, emb = cols.take(keep), emb[keep]
                            cols.labels = _remap_labels(cols.labels, pf.classes, m.classes).astype(np.int32)
                            sink.append(cols, emb)
                written = sink.close()
            except BaseException as exc:
                sink.abort(exc)
                raise
            info = PartInfo.of(written, n_rows, failures=len(failures), tombstones=len(carried))
        new = m.copy()
        at = min(m.names().index(n) for n in group)
        new.parts = [p for p in new.parts if p.name not in gset]
        if info is not None:
            new.parts.insert(at, info)
        new.generation = m.generation + 1
        new.garbage = new.garbage + [(n, new.generation) for n in group]
        write_manifest(self.path, new)
        self.manifest, self._garbage_dirty = new, False
        old_uids = {self._parts[n].uid for n in group}
        for n in group:
            del self._parts[n]
        if info is not None:
            st = self._parts[info.name] = _Part(self._new_uid())
            if self._index is not None:
                self._repoint(info, st.uid, failures)
        elif self._failures is not None:
            self._failures = {k: v for k, v in self._failures.items() if v[0] not in old_uids}
        spent = time.perf_counter() - t0
        self.stats.merges += 1
        self.stats.merge_seconds += spent
        self.stats.merged_rows += n_rows
        self.stats.largest_merge_seconds = max(self.stats.largest_merge_seconds, spent)
        self._collect_garbage()

    def _repoint(self, info: PartInfo, uid: int, failures: FailureColumns) -> None:
        """After a merge: the index's entries for the merged rows point into the new part."""
        pf = PartFile(self.path, self.parts_dir, info.name, info)
        try:
            step = 1 << 20
            for a in range(0, info.rows, step):
                keys = pf.column("keys", slice(a, a + step))
                self._index.move(keys, uid, np.arange(a, a + len(keys)))
        finally:
            pf.close()
        for j, (p, r, s, m) in enumerate(failures.items()):
            self._failures[(int(failures.keys[j, 0]), int(failures.keys[j, 1]))] = (uid, j, p, r, s, m)

    # ------------------------------------------------------------------ consistency

    def dedupe(self) -> int:
        """Tombstone every live row or failure record whose path also lives in a newer part (a
        manifest rebuilt from parts may list both). Returns how many were superseded."""
        self._load()
        keys, where = [], []  # where: (part position, kind, row) of each live entry
        for i, p in enumerate(self.manifest.parts):
            if not (p.rows or p.failures):
                continue
            rmask, fmask = self._parts[p.name].masks(p)
            pf = PartFile(self.path, self.parts_dir, p.name, p)
            try:
                if p.rows:
                    live = np.flatnonzero(~rmask)
                    keys.append(pf.column("keys")[live])
                    where.append(np.stack([np.full(len(live), i), np.zeros(len(live), np.int64), live], axis=1))
                if p.failures:
                    live = np.flatnonzero(~fmask)
                    keys.append(pf.failures().keys[live])
                    where.append(np.stack([np.full(len(live), i), np.ones(len(live), np.int64), live], axis=1))
            finally:
                pf.close()
        if not keys:
            return 0
        k, w = np.concatenate(keys), np.concatenate(where)
        order = np.lexsort((w[:, 0], k[:, 1], k[:, 0]))  # by key, then part age
        ks = k[order]
        superseded = np.zeros(len(order), bool)
        superseded[:-1] = (ks[1:] == ks[:-1]).all(axis=1)  # a newer entry of the same key follows
        dup = w[order[superseded]]
        if not len(dup):
            return 0
        names = self.manifest.names()
        tomb = Tombstones.from_triples((names[int(i)], int(kind), int(r)) for i, kind, r in dup.tolist())
        new = self.manifest.copy()
        name = new_part_name(self.tag)
        written = write_part(self.parts_dir, name, RowColumns.empty(), np.zeros((0, int(new.meta["embed_dim"])), new.meta["dtype"]),
                             meta=new.meta, base_generation=new.generation, kind="commit", tombstones=tomb)
        new.parts.append(PartInfo.of(written, tombstones=len(tomb)))
        self._count_deletions(new, tomb)
        new.generation += 1
        write_manifest(self.path, new)
        self.manifest = new
        self._parts[name] = _Part(self._new_uid())
        self._apply_deletions(tomb)
        self._index, self._failures = None, None  # rebuilt on the next commit
        return len(tomb)


@contextmanager
def _closing(pf: PartFile) -> Iterator[PartFile]:
    try:
        yield pf
    finally:
        pf.close()


def _close_and_version(path: Path) -> tuple[None, int]:
    f, version = open_cache_file(path)
    f.close()
    return None, version
