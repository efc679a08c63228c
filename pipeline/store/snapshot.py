"""A pinned version of a cache for reading: its parts, their deletions, and reads that stay
inside that version to the end.

``open_snapshot(path)`` takes a reader lease, reads the manifest once, and from then on
reads only the parts that manifest named — a compaction running meanwhile cannot change
what this reader sees (its old parts are kept until the lease is released), and if a part
disappears anyway the read fails with :class:`SnapshotGoneError` instead of returning
rows of another version. Row ids (``RowTable.index_rows``) are positions in this version:
part after part, deleted rows included, so they mean nothing to another snapshot.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError, SnapshotGoneError
from .columns import FailureColumns, remap_labels
from .leases import ReaderLease
from .manifest import Manifest, PartInfo, read_manifest
from .parts import PartFile
from .schema import open_cache_file, parts_dir_for


class RowColumnsView:
    """The live rows of one snapshot as numpy columns, in snapshot order (before sorting)."""

    def __init__(self, ids, paths_raw, labels, split, size, mtime_ns, sha256):
        self.ids, self.paths_raw, self.labels, self.split = ids, paths_raw, labels, split
        self.size, self.mtime_ns, self.sha256 = size, mtime_ns, sha256


class Snapshot:
    """One schema-2 version of a cache (see the module docstring)."""

    schema_version = 2

    def __init__(self, path: Path, manifest: Manifest, lease: ReaderLease):
        self.path, self.parts_dir = Path(path), parts_dir_for(path)
        self.manifest, self.lease = manifest, lease
        self.parts: list[PartInfo] = list(manifest.parts)
        self.offsets = np.concatenate([[0], np.cumsum([p.rows for p in self.parts], dtype=np.int64)]).astype(np.int64)
        self._files: dict[int, PartFile] = {}
        self._deletions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._scratch: np.ndarray | None = None  # ``read_sorted_into``'s span buffer, reused chunk after chunk
        missing = [p.name for p in self.parts if not (self.parts_dir / p.name).is_file()]
        if missing:
            self.close()
            raise self._gone_or_moved(missing)
        self._finalizer = weakref.finalize(self, _close_all, self._files, lease)

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def n_rows(self) -> int:
        """Live rows (without reading any part)."""
        return self.manifest.live_rows()

    def _gone_or_moved(self, missing: list[str]) -> CacheError:
        try:
            now = read_manifest(self.path).generation
        except CacheError:
            now = self.generation
        if now != self.generation:
            return SnapshotGoneError(
                f"cache {str(self.path)!r} changed while it was being read: version {self.generation} lost part {missing[0]} "
                f"(now at version {now}; a writer compacted it without seeing this reader); run the command again")
        return CacheError(f"cache {str(self.path)!r} is missing {len(missing)} part file(s) in {str(self.parts_dir)!r} "
                          f"(e.g. {missing[0]}); the cache was moved without its .parts folder — move both — or re-run your extract "
                          "command with --repair")

    def file(self, i: int) -> PartFile:
        pf = self._files.get(i)
        if pf is None:
            info = self.parts[i]
            if not (self.parts_dir / info.name).is_file():
                raise self._gone_or_moved([info.name])
            pf = self._files[i] = PartFile(self.path, self.parts_dir, info.name, info)
        return pf

    def deletions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """part name -> (deleted row mask, deleted failure mask), from every part's tombstones."""
        if self._deletions is None:
            rows = {p.name: np.zeros(p.rows, bool) for p in self.parts}
            fails = {p.name: np.zeros(p.failures, bool) for p in self.parts}
            for i, p in enumerate(self.parts):
                if not p.tombstones:
                    continue
                for target, (r, fr) in self.file(i).tombstones().by_target().items():
                    if target in rows:
                        rows[target][r[r < len(rows[target])]] = True
                        fails[target][fr[fr < len(fails[target])]] = True
            self._deletions = {n: (rows[n], fails[n]) for n in rows}
        return self._deletions

    def live_columns(self, fields: tuple[str, ...] = ("paths", "labels", "split", "size", "mtime_ns", "sha256")) -> RowColumnsView:
        """Every live row's metadata (no embeddings), labels mapped to the current classes;
        only ``fields`` are read (the others come back empty)."""
        classes = self.manifest.classes
        dels = self.deletions()
        empty = {"paths": np.zeros(0, "S1"), "labels": np.zeros(0, np.int64), "split": np.zeros(0, np.uint8), "size": np.zeros(0, np.int64),
                 "mtime_ns": np.zeros(0, np.int64), "sha256": np.zeros((0, 32), np.uint8)}
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", *empty)}
        for i, p in enumerate(self.parts):
            if not p.rows:
                continue
            pf = self.file(i)
            live = np.flatnonzero(~dels[p.name][0])
            chunks["ids"].append(self.offsets[i] + live)
            for name in fields:
                col = pf.column(name)[live]
                chunks[name].append(remap_labels(col, pf.classes, classes) if name == "labels" else col)
        out = {}
        for k in list(chunks):  # one column joined at a time, its parts dropped: the peak is the columns plus one
            parts = chunks.pop(k)
            out[k] = np.concatenate(parts) if parts else empty.get(k, np.zeros(0, np.int64))
            del parts
        return RowColumnsView(out["ids"], out["paths"], out["labels"], out["split"], out["size"], out["mtime_ns"], out["sha256"])

    def failure_columns(self) -> FailureColumns:
        dels = self.deletions()
        found = [self.file(i).failures().take(~dels[p.name][1]) for i, p in enumerate(self.parts) if p.failures]
        return FailureColumns.concat(found)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings of row ids (unique, any order) of this version."""
        ids = np.asarray(ids, dtype=np.int64)
        dim, dtype = int(self.meta["embed_dim"]), np.dtype(self.meta["dtype"])
        out = np.empty((len(ids), dim), dtype=dtype)
        if not len(ids):
            return out
        ascending = bool(np.all(ids[1:] > ids[:-1]))
        order = None if ascending else np.argsort(ids, kind="stable")
        sorted_ids = ids if ascending else ids[order]
        which = np.searchsorted(self.offsets, sorted_ids, side="right") - 1
        if sorted_ids[0] < 0 or sorted_ids[-1] >= self.offsets[-1]:
            raise IndexError(f"row ids outside this cache version (0..{self.offsets[-1] - 1})")
        bounds = np.flatnonzero(np.diff(which)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(ids)]])):
            i = int(which[lo])
            local = sorted_ids[lo:hi] - self.offsets[i]
            if ascending:  # a slice of ``out``: no scatter (a fancy assignment is several times slower than the read)
                out[lo:hi] = _read_rows(self.file(i), local)
            else:
                out[order[lo:hi]] = _read_rows(self.file(i), local)
        return out

    def read_into(self, out: np.ndarray, ids: np.ndarray, where: np.ndarray, min_run: int = 256) -> None:
        """``out[where[k]] = embedding of ids[k]`` for ascending ``ids``: long runs that are
        contiguous on both sides are decoded straight into ``out`` (no intermediate copy),
        the rest is gathered chunk by chunk."""
        ids, where = np.asarray(ids, np.int64), np.asarray(where, np.int64)
        if not len(ids):
            return
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(where) != 1) | (np.diff(part) != 0)) + 1
        starts, ends = np.concatenate([[0], brk]), np.concatenate([brk, [len(ids)]])
        long = ends - starts >= min_run
        for s, e in zip(starts[long].tolist(), ends[long].tolist()):
            i = int(part[s])
            self.file(i).read_direct(out, int(ids[s] - self.offsets[i]), e - s, int(where[s]))
        rest = np.flatnonzero(np.repeat(~long, ends - starts))
        step = gather_rows(out)
        for c in range(0, len(rest), step):
            sel = rest[c : c + step]
            out[where[sel]] = self.read(ids[sel])

    def read_sorted_into(self, out: np.ndarray, ids: np.ndarray, gap: int = 256) -> None:
        """``out[k] = embedding of ids[k]`` for ascending ``ids`` (a chunk of rows streamed in
        storage order): each stretch of nearby rows (gaps up to ``gap``) is decoded into one
        scratch span and taken from it straight into ``out``: one HDF5 read and one copy."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        if ids[0] < 0 or ids[-1] >= self.offsets[-1]:
            raise IndexError(f"row ids outside this cache version (0..{self.offsets[-1] - 1})")
        span_rows = max(gap + 1, GATHER_BYTES // max(1, out.shape[1] * out.itemsize))  # the scratch span stays under ~2 x GATHER_BYTES
        brk = np.flatnonzero((np.diff(ids) > gap) | (np.diff(part) != 0) | (np.diff(ids // span_rows) != 0)) + 1
        for s, e in zip(np.r_[0, brk].tolist(), np.r_[brk, len(ids)].tolist()):
            i = int(part[s])
            a, span = int(ids[s] - self.offsets[i]), int(ids[e - 1] - ids[s]) + 1
            if span == e - s:  # no gap: decoded in place
                self.file(i).read_direct(out, a, span, s)
                continue
            scratch = self._scratch
            if scratch is None or len(scratch) < span or scratch.shape[1:] != out.shape[1:] or scratch.dtype != out.dtype:
                scratch = self._scratch = np.empty((max(span, span_rows), *out.shape[1:]), dtype=out.dtype)  # kept: the next chunk reuses it
            self.file(i).read_direct(scratch, a, span, 0)
            np.take(scratch, ids[s:e] - ids[s], axis=0, out=out[s:e], mode="clip")  # in range by construction; "raise" would buffer a copy

    def close(self) -> None:
        _close_all(self._files, self.lease)


GATHER_BYTES = 64 << 20  # what one gathered chunk of rows may take beside ``out`` (the audit reads 50,000 x 2,048 caches)


def gather_rows(out: np.ndarray) -> int:
    """Rows per gathered chunk when filling ``out``: at most 65,536, and at most
    ``GATHER_BYTES`` of them (8,192 rows at 2,048-d float32, where 65,536 would be 512 MiB)."""
    return max(1, min(1 << 16, GATHER_BYTES // max(1, out.shape[1] * out.itemsize)))


def _read_rows(pf: PartFile, local: np.ndarray, gap: int = 256) -> np.ndarray:
    """Sorted unique local rows of one part, read as runs of nearby rows (a run's gaps of up
    to ``gap`` rows are read and dropped: far cheaper than HDF5 point selections). No run
    spans more than ``GATHER_BYTES`` of rows: a sparse sample (every 25th row of a 2 GB part)
    would otherwise be one run, the whole part read into memory to keep 4 % of it."""
    a, b = int(local[0]), int(local[-1]) + 1
    if b - a == len(local):  # a whole span (load_cache, merges): no gather
        return pf.embeddings(slice(a, b))
    span = max(gap + 1, GATHER_BYTES // max(1, pf.row_bytes))
    breaks = np.flatnonzero((np.diff(local) > gap) | (np.diff(local // span) != 0)) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(local)]])
    if len(starts) == 1:
        a = int(local[0])
        return pf.embeddings(slice(a, int(local[-1]) + 1))[local - a]
    blocks = []
    for s, e in zip(starts, ends):
        a = int(local[s])
        blocks.append(pf.embeddings(slice(a, int(local[e - 1]) + 1))[local[s:e] - a])
    return np.concatenate(blocks)


def _close_all(files: dict[int, PartFile], lease: ReaderLease) -> None:
    for pf in files.values():
        pf.close()
    files.clear()
    lease.release()


def open_snapshot(path: str | Path):
    """Pin the current version of the cache at ``path`` (schema 2, or a schema-1 cache read as is).

    Raises:
        UsageError (missing path), CacheError (not a cache, newer schema, missing parts),
        DamagedCacheError (the manifest's checksums fail).
    """
    from .legacy import LegacySnapshot

    path = Path(path)
    parts_dir = parts_dir_for(path)
    f, version = open_cache_file(path)  # clear errors for missing/foreign files before anything is created
    f.close()
    lease = ReaderLease(parts_dir)
    try:
        f, version = open_cache_file(path)  # again, now that the lease protects what we read
        if version < 2:
            return LegacySnapshot(path, f, lease)
        f.close()
        manifest = read_manifest(path)
        lease.pin(manifest.generation)
        return Snapshot(path, manifest, lease)
    except BaseException:
        lease.release()
        raise


def iter_snapshot_embeddings(snapshot, index_rows: np.ndarray, chunk_rows: int = 8192) -> Iterator[tuple[slice, np.ndarray]]:
    index_rows = np.asarray(index_rows, dtype=np.int64)
    for start in range(0, len(index_rows), chunk_rows):
        want = index_rows[start : start + chunk_rows]
        yield slice(start, start + len(want)), snapshot.read(want)

