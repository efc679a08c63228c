"""Reading a cache: its provenance, its current rows and its embeddings, without the
writer's lock. Everything is read from one pinned version (``snapshot.py``), with numpy
columns rather than a Python object per row."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..memory import return_freed_memory
from ..provenance import recorded
from .columns import decode_strings, joined_rows, sha_hex, split_names
from .schema import open_cache_file, parts_dir_for
from .snapshot import open_snapshot


@dataclass
class CacheData:
    """What ``load_cache`` returns: the current rows, sorted by path."""

    path: Path
    embeddings: np.ndarray  # [N, D]
    labels: np.ndarray  # [N] int64, -1 = unlabeled
    paths: np.ndarray  # [N] str (numpy StringDType), relative to the data root
    classes: list[str]
    split: np.ndarray  # [N] str: "train", "val", "test" or ""
    failures: list[tuple[str, str]]  # (relative path, reason)
    meta: dict[str, Any]  # provenance
    fingerprints: dict[str, np.ndarray] = field(default_factory=dict)  # size, mtime_ns [N] int64; sha256 [N, 32] uint8

    @property
    def engine(self) -> str:
        """The engine that last extracted into this cache (eager, compile)."""
        return str(self.meta.get("engine", "eager"))

    @property
    def decode(self) -> str:
        """exact, or the opt-in draft / gpu JPEG decoding (changes pixels; never mixed with exact)."""
        return str(recorded(self.meta, "decode"))

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: every row of a cache shares it (mixing is refused)."""
        return str(recorded(self.meta, "precision"))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])


class RowTable:
    """Per-row metadata of the current rows (sorted by path) of one pinned cache version, and
    their row ids in it (``index_rows``) for :func:`iter_embeddings`.

    The table holds its version open (a reader lease: a compaction meanwhile keeps the parts
    this table reads); ``close()`` it, use it as a context manager, or let it be collected."""

    def __init__(self, path: Path, snapshot, index_rows: np.ndarray, paths_raw: np.ndarray, labels: np.ndarray, split_codes: np.ndarray,
                 fingerprints: dict[str, np.ndarray]):
        self.path, self.snapshot = Path(path), snapshot
        self.index_rows, self.labels, self.fingerprints = index_rows, labels, fingerprints
        self.paths_raw = paths_raw  # UTF-8 bytes, for vectorised work
        self.paths = decode_strings(paths_raw)
        self.split = split_names(split_codes)
        self.meta: dict[str, Any] = snapshot.meta

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def nbytes(self) -> int:
        """Memory the table's columns hold (decoded paths: their array and, roughly, their text)."""
        arrays = [self.index_rows, self.labels, self.paths_raw, self.paths, self.split, *self.fingerprints.values()]
        return int(sum(getattr(a, "nbytes", 0) for a in arrays) + self.paths_raw.nbytes)

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    def __len__(self) -> int:
        return len(self.index_rows)

    def sha256_hex(self, rows: np.ndarray | slice = slice(None)) -> list[str]:
        return [h.decode() for h in sha_hex(self.fingerprints["sha256"][rows]).tolist()]

    def content_digest(self) -> str:
        """Hash of what a head learns from: every current row's path, label and file hash, the
        class names and the backbone identity. Unchanged by compaction or re-commits (and the
        same value schema 1 gave), so "has this cache changed since the head was fitted?" is
        one comparison."""
        h = hashlib.sha256()
        ident = {k: self.meta.get(k) for k in ("model", "weights", "preprocessing", "embed_dim", "dtype")}
        h.update(json.dumps([self.classes, ident], sort_keys=True).encode())
        step = 1 << 16
        for s in range(0, len(self), step):
            labels = self.labels[s : s + step].astype("S")
            h.update(joined_rows([self.paths_raw[s : s + step], b"\0", labels, b"\0", sha_hex(self.fingerprints["sha256"][s : s + step]), b"\n"]))
        return h.hexdigest()[:32]

    def close(self) -> None:
        self.snapshot.close()

    def __enter__(self) -> RowTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_cache_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance of a cache without reading its rows."""
    snap = open_snapshot(path)
    try:
        return dict(snap.meta)
    finally:
        snap.close()


def read_index_info(path: str | os.PathLike) -> dict[str, Any]:
    """Failures, times, schema and part counts of a cache (no rows, no embeddings)."""
    snap = open_snapshot(path)
    try:
        fails = snap.failure_columns().items()
        f, _ = open_cache_file(Path(path))
        with f:
            updated, created = float(f.attrs.get("updated", 0)), float(f.attrs.get("created", 0))
        return {"failures": sorted((p, r) for p, r, _, _ in fails), "updated": updated, "created": created, "parts": len(snap.parts),
                "schema_version": snap.schema_version, "generation": snap.generation, "rows": snap.n_rows,
                "largest_part_rows": max((p.rows for p in snap.parts), default=0),
                "deleted_rows": sum(p.deleted for p in snap.parts), "garbage_files": len(getattr(getattr(snap, "manifest", None), "garbage", []))}
    finally:
        snap.close()


def read_rows(path: str | os.PathLike) -> RowTable:
    """Everything but the embeddings, sorted by path: cheap even for caches larger than memory.

    Raises:
        UsageError, CacheError, DamagedCacheError: see :func:`load_cache`.
    """
    snap = open_snapshot(path)
    try:
        view = snap.live_columns()
    except BaseException:
        snap.close()
        raise
    order = np.argsort(view.paths_raw, kind="stable")
    columns = {}
    for name in ("ids", "paths_raw", "labels", "split", "size", "mtime_ns", "sha256"):  # one at a time, its unsorted copy dropped: the peak is the columns plus one
        columns[name] = getattr(view, name)[order]
        setattr(view, name, None)
    del view, order
    ids, paths_raw, labels, split = columns.pop("ids"), columns.pop("paths_raw"), columns.pop("labels"), columns.pop("split")
    fingerprints = columns
    table = RowTable(Path(path), snap, ids, paths_raw, labels, split, fingerprints)
    return_freed_memory()  # the columns as read and their sorting: ~1 GB of heap at 10 M rows, kept by glibc unless handed back
    return table


def iter_embeddings(table: RowTable, index_rows: np.ndarray, chunk_rows: int = 8192) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(positions, embeddings)`` for ``index_rows`` (ids from ``table.index_rows``, any
    order) chunk by chunk, from the table's own cache version; memory ~ ``chunk_rows x D``."""
    source = getattr(table, "snapshot", table)
    if not hasattr(source, "read"):
        raise TypeError("iter_embeddings takes the RowTable that read_rows returned (row ids belong to one cache version), "
                        f"not {type(table).__name__}")
    index_rows = np.asarray(index_rows, dtype=np.int64)
    for start in range(0, len(index_rows), chunk_rows):
        want = index_rows[start : start + chunk_rows]
        yield slice(start, start + len(want)), source.read(want)


def load_cache(path: str | os.PathLike) -> CacheData:
    """Read the current rows of a cache into memory (sorted by relative path).

    Raises:
        UsageError: the path is missing or a folder.
        CacheError: not a cache, newer schema, missing parts, or a version gone while reading.
        DamagedCacheError: a part's or the manifest's checksums fail (exit 5, naming the part).
    """
    with read_rows(path) as table:
        dim = int(table.meta["embed_dim"])
        emb = np.empty((len(table), dim), dtype=np.dtype(table.meta.get("dtype", "float32")))
        order = np.argsort(table.index_rows)  # read in storage order (long runs), place in path order
        table.snapshot.read_into(emb, table.index_rows[order], order)
        fails = sorted((p, r) for p, r, _, _ in table.snapshot.failure_columns().items())
        return CacheData(Path(path), emb, table.labels, table.paths, table.classes, table.split, fails, dict(table.meta), table.fingerprints)


def cache_disk_bytes(path: Path) -> int:
    """Bytes of the manifest and every file in its parts folder (retired parts a reader still holds included)."""
    path = Path(path)
    total = path.stat().st_size if path.exists() else 0
    folder = parts_dir_for(path)
    if folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total
