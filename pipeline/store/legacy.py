"""Schema 1 (featcache before the store kept rows in its parts): read as it is, and the
inputs of its migration to schema 2 (``migrate.py``).

A schema-1 cache is an index ``X.h5`` holding every row's metadata, a ``valid`` mask and a
virtual dataset ``embeddings`` over ``X.h5.parts/part-*.h5``; a part the index does not name
but written against its generation is a commit whose index update was lost (kept).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError
from .columns import FailureColumns, RowColumns, path_keys, sha_raw, split_codes
from .leases import ReaderLease
from .manifest import PartInfo
from .schema import PART_FORMAT, parts_dir_for, same_backbone_rows
from .snapshot import RowColumnsView, gather_rows

DAMAGE = (OSError, KeyError, ValueError, TypeError, RuntimeError)


def _bytes_column(ds: h5py.Dataset) -> np.ndarray:
    """A schema-1 variable-length string dataset as fixed-width UTF-8 bytes."""
    values = ds[...].tolist() if ds.shape[0] else []
    return np.array([v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape") for v in values], dtype="S") if values else np.zeros(0, "S1")


def _split_from_bytes(values: np.ndarray) -> np.ndarray:
    return split_codes([v.decode() for v in values.tolist()]) if len(values) else np.zeros(0, np.uint8)


class LegacySnapshot:
    """A schema-1 cache opened for reading (same interface as ``Snapshot``)."""

    schema_version = 1

    def __init__(self, path: Path, f: h5py.File, lease: ReaderLease):
        self.path, self.parts_dir, self.f, self.lease = Path(path), parts_dir_for(path), f, lease
        try:
            self.meta: dict[str, Any] = json.loads(f.attrs["meta_json"])
            self.generation = int(f.attrs.get("generation", 0))
            names = [n.decode() if isinstance(n, bytes) else n for n in f["parts/names"][...].tolist()]
            rows = [int(r) for r in f["parts/rows"][...]]
            self._valid = f["valid"][...].astype(bool)
        except DAMAGE as exc:
            self.close()
            raise CacheError(f"cache {str(path)!r} (schema 1) is damaged ({type(exc).__name__}: {str(exc)[:100]}); re-extract into a new --out") from None
        self.parts = [PartInfo(n, r) for n, r in zip(names, rows)]
        missing = [n for n in names if not (self.parts_dir / n).is_file()]
        if missing:
            self.close()
            raise CacheError(f"cache {str(path)!r} is missing {len(missing)} part file(s) in {str(self.parts_dir)!r} (e.g. {missing[0]}); "
                             "the cache was moved without its .parts folder — move both, or re-extract")

    @property
    def n_rows(self) -> int:
        return int(self._valid.sum())

    def live_columns(self, fields: tuple[str, ...] = ()) -> RowColumnsView:  # schema 1 reads every column anyway
        f = self.f
        rows = np.flatnonzero(self._valid)
        try:
            paths = _bytes_column(f["paths"])
            sha = sha_raw([s.decode() for s in _bytes_column(f["fingerprints/sha256"]).tolist()])
            return RowColumnsView(rows, paths[rows], f["labels"][...].astype(np.int64)[rows], _split_from_bytes(_bytes_column(f["split"]))[rows],
                                  f["fingerprints/size"][...][rows], f["fingerprints/mtime_ns"][...][rows], sha[rows])
        except DAMAGE as exc:
            raise CacheError(f"cache {str(self.path)!r} (schema 1) is damaged ({type(exc).__name__}); re-extract into a new --out") from None

    def failure_columns(self) -> FailureColumns:
        g = self.f["failures"]
        paths, reasons = _bytes_column(g["paths"]), _bytes_column(g["reasons"])
        return FailureColumns(paths, reasons, g["size"][...].astype(np.int64), g["mtime_ns"][...].astype(np.int64), path_keys(paths))

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        ds = self.f["embeddings"]
        out = np.empty((len(ids), ds.shape[1]), dtype=ds.dtype)
        if len(ids):
            order = np.argsort(ids)
            want = ids[order]
            lo, hi = int(want[0]), int(want[-1]) + 1
            try:
                out[order] = ds[lo:hi][want - lo] if hi - lo <= 4 * len(want) else ds[want]
            except DAMAGE as exc:
                raise CacheError(f"cache {str(self.path)!r} (schema 1) has unreadable embeddings ({type(exc).__name__}); re-extract into a new --out") from None
            if np.isnan(out).any():
                raise CacheError(f"cache {str(self.path)!r} has unreadable embedding rows (a part file is damaged); re-extract into a new --out")
        return out

    def read_into(self, out: np.ndarray, ids: np.ndarray, where: np.ndarray) -> None:
        """``out[where[k]] = embedding of ids[k]``, chunk by chunk."""
        step = gather_rows(out)
        for c in range(0, len(ids), step):
            out[where[c : c + step]] = self.read(ids[c : c + step])

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        self.lease.release()


# ----------------------------------------------------------------------------- migration inputs


def read_v1_rows(snapshot: LegacySnapshot) -> tuple[np.ndarray, RowColumns, list[tuple[str, str, int, int]]]:
    """(index positions, columns, failures) of a schema-1 cache's current rows, labels by its classes."""
    view = snapshot.live_columns()
    cols = RowColumns(view.paths_raw, view.labels.astype(np.int32), view.split, view.size.astype(np.int64), view.mtime_ns.astype(np.int64),
                      view.sha256, path_keys(view.paths_raw))
    return view.ids, cols, snapshot.failure_columns().items()


def v1_orphans(snapshot: LegacySnapshot, meta: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    """(adoptable, stale) schema-1 part files the index does not name: adoptable ones are
    complete commits written against the index's generation by a writer that died."""
    listed = {p.name for p in snapshot.parts}
    keep, stale = [], []
    if not snapshot.parts_dir.is_dir():
        return keep, stale
    for entry in sorted(snapshot.parts_dir.glob("part-*.h5")):
        if entry.name in listed:
            continue
        try:
            with h5py.File(entry, "r") as f:
                ok = (f.attrs.get("format") == PART_FORMAT and int(f.attrs.get("schema_version", 0)) == 1
                      and int(f.attrs.get("base_generation", -1)) >= snapshot.generation and same_backbone_rows(json.loads(f.attrs["meta_json"]), meta))
        except DAMAGE:
            ok = False
        (keep if ok else stale).append(entry)
    return keep, stale


def read_v1_part(path: Path, classes: list[str]) -> tuple[RowColumns, np.ndarray]:
    """A schema-1 part's rows (labels mapped to ``classes`` by name) and embeddings."""
    with h5py.File(path, "r") as f:
        part_classes = json.loads(f.attrs["meta_json"]).get("classes", [])
        paths = _bytes_column(f["paths"])
        labels = f["labels"][...].astype(np.int64)
        if part_classes != classes:
            pos = {c: i for i, c in enumerate(classes)}
            table = np.array([pos.get(c, -1) for c in part_classes] + [-1], dtype=np.int64)
            labels = table[labels]
        cols = RowColumns(paths, labels.astype(np.int32), _split_from_bytes(_bytes_column(f["split"])), f["size"][...].astype(np.int64),
                          f["mtime_ns"][...].astype(np.int64), sha_raw([s.decode() for s in _bytes_column(f["sha256"]).tolist()]), path_keys(paths))
        return cols, f["embeddings"][...]

