"""Reading a cache: its provenance, its current rows (paths, labels, split, fingerprints)
and its embeddings in chunks, without the writer's lock."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CacheError
from .schema import COMPAT_DEFAULTS, check_parts_present, open_index, parts_dir_for, read_strings

# ----------------------------------------------------------------------------- reading


@dataclass
class CacheData:
    """What ``load_cache`` returns: the current rows, sorted by path."""

    path: Path
    embeddings: np.ndarray  # [N, D]
    labels: np.ndarray  # [N] int64, -1 = unlabeled
    paths: list[str]  # relative to the data root
    classes: list[str]
    split: list[str]  # per row: "train", "val", "test" or ""
    failures: list[tuple[str, str]]  # (relative path, reason)
    meta: dict[str, Any]  # provenance
    fingerprints: dict[str, np.ndarray] = field(default_factory=dict)  # size, mtime_ns, sha256

    @property
    def engine(self) -> str:
        """The engine that last extracted into this cache (eager, compile)."""
        return str(self.meta.get("engine", "eager"))

    @property
    def decode(self) -> str:
        """exact, or the opt-in draft / gpu JPEG decoding (changes pixels; never mixed with exact)."""
        return str(self.meta.get("decode", COMPAT_DEFAULTS["decode"]))

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: every row of a cache shares it (mixing is refused)."""
        return str(self.meta.get("precision", COMPAT_DEFAULTS["precision"]))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])


def read_cache_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance of a cache without reading its rows."""
    with open_index(Path(path)) as f:
        return json.loads(f.attrs["meta_json"])


def read_index_info(path: str | os.PathLike) -> dict[str, Any]:
    """Failures, last update time and part count of a cache (no rows, no embeddings)."""
    with open_index(Path(path)) as f:
        return {
            "failures": list(zip(read_strings(f["failures/paths"]), read_strings(f["failures/reasons"]))),
            "updated": float(f.attrs.get("updated", 0)),
            "created": float(f.attrs.get("created", 0)),
            "parts": int(f["parts/names"].shape[0]),
        }


@dataclass
class RowTable:
    """Per-row metadata of the valid rows, plus their positions in the index (for streaming)."""

    path: Path
    index_rows: np.ndarray  # positions in the index's datasets, sorted by path
    paths: list[str]
    labels: np.ndarray
    split: list[str]
    meta: dict[str, Any]
    fingerprints: dict[str, np.ndarray]  # size, mtime_ns, sha256 per row

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def content_digest(self) -> str:
        """Hash of what a head learns from: every valid row's path, label and file hash, the
        class names and the backbone identity. Unchanged by compaction or re-commits, so
        "has this cache changed since the head was fitted?" is one comparison."""
        h = hashlib.sha256()
        ident = {k: self.meta.get(k) for k in ("model", "weights", "preprocessing", "embed_dim", "dtype")}
        h.update(json.dumps([self.classes, ident], sort_keys=True).encode())
        for path, label, sha in zip(self.paths, self.labels.tolist(), self.fingerprints["sha256"]):
            h.update(f"{path}\0{label}\0{sha}\n".encode())
        return h.hexdigest()[:32]


def read_rows(path: str | os.PathLike) -> RowTable:
    """Everything but the embeddings: cheap even for caches larger than memory."""
    path = Path(path)
    with open_index(path) as f:
        meta = json.loads(f.attrs["meta_json"])
        check_parts_present(path, read_strings(f["parts/names"]))
        valid = f["valid"][...].astype(bool)
        all_paths = np.array(read_strings(f["paths"]), dtype=object)
        all_split = np.array(read_strings(f["split"]), dtype=object)
        labels = f["labels"][...].astype(np.int64)
        fingerprints = {
            "size": f["fingerprints/size"][...],
            "mtime_ns": f["fingerprints/mtime_ns"][...],
            "sha256": np.array(read_strings(f["fingerprints/sha256"]), dtype=object),
        }
    rows = np.flatnonzero(valid)
    order = np.argsort(all_paths[rows].astype(str), kind="stable") if len(rows) else rows
    rows = rows[order]
    fingerprints = {k: v[rows] if len(v) else v for k, v in fingerprints.items()}
    return RowTable(path, rows, list(all_paths[rows]), labels[rows], list(all_split[rows]), meta, fingerprints)


def iter_embeddings(path: str | os.PathLike, index_rows: np.ndarray, chunk_rows: int = 8192) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(positions, embeddings)`` for ``index_rows`` (any order) chunk by chunk.

    Reads contiguous spans of the index, so memory stays ~ ``chunk_rows x D``.
    """
    index_rows = np.asarray(index_rows, dtype=np.int64)
    with open_index(Path(path)) as f:
        ds = f["embeddings"]
        for start in range(0, len(index_rows), chunk_rows):
            want = index_rows[start : start + chunk_rows]
            lo, hi = int(want.min()), int(want.max()) + 1
            if hi - lo <= 4 * len(want):
                block = ds[lo:hi]
                out = block[want - lo]
            else:  # scattered rows: read them in sorted order
                order = np.argsort(want)
                out = np.empty((len(want), ds.shape[1]), dtype=ds.dtype)
                out[order] = ds[want[order]]
            yield slice(start, start + len(want)), out


def load_cache(path: str | os.PathLike) -> CacheData:
    """Read the current rows of a cache into memory (sorted by relative path).

    Raises:
        CacheError: missing, truncated, foreign, newer-schema cache, or missing parts.
    """
    table = read_rows(path)
    dim = int(table.meta["embed_dim"])
    emb = np.empty((len(table.index_rows), dim), dtype=np.dtype(table.meta.get("dtype", "float32")))
    for pos, block in iter_embeddings(path, table.index_rows):
        emb[pos] = block
    fail = read_index_info(path)["failures"]
    if len(emb) and np.isnan(emb).any():
        raise CacheError(f"cache {str(path)!r} has unreadable embedding rows (a part file is damaged); re-extract into a new --out")
    return CacheData(Path(path), emb, table.labels, table.paths, table.classes, table.split, sorted(fail), table.meta, table.fingerprints)


def cache_disk_bytes(path: Path) -> int:
    total = path.stat().st_size if path.exists() else 0
    folder = parts_dir_for(path)
    if folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total
