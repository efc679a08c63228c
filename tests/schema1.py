"""A schema-1 cache writer: featcache's store before schema 2, kept (trimmed to what writes a
cache) so tests can build the caches users have on disk and check that schema 2 reads and
migrates them, and so bench/cache_scale.py can measure the old layout side by side.

Layout: an index ``X.h5`` with every row's metadata, a ``valid`` mask and a virtual dataset
over ``X.h5.parts/part-*.h5``; each commit writes one part and rewrites the whole index.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path

import h5py
import numpy as np

STR = h5py.string_dtype("utf-8")


def _atomic_bytes(final: Path, data) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


class Schema1Writer:
    """``add(paths, embeddings, labels, split, size, mtime_ns, sha256)`` then ``commit()``; as
    schema 1 did, every commit rewrites the whole index (its cost grows with the cache)."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.meta = dict(meta)
        self.generation = 0
        self.parts: list[str] = []
        self.part_rows: list[int] = []
        self.cols = {k: [] for k in ("paths", "labels", "split", "size", "mtime_ns", "sha256")}
        self.valid: list[bool] = []
        self.where: dict[str, int] = {}
        self.failures: dict[str, tuple[str, int, int]] = {}
        self._buf: list[tuple[dict, np.ndarray]] = []
        self.created = time.time()

    def add(self, paths, embeddings, labels=None, split=None, size=None, mtime_ns=None, sha256=None):
        n = len(paths)
        rows = {"paths": list(paths), "labels": list(labels if labels is not None else [-1] * n), "split": list(split if split is not None else [""] * n),
                "size": list(size if size is not None else [1] * n), "mtime_ns": list(mtime_ns if mtime_ns is not None else [1] * n),
                "sha256": list(sha256 if sha256 is not None else [""] * n)}
        self._buf.append((rows, np.asarray(embeddings, dtype=self.meta["dtype"])))

    def add_failure(self, path, reason, size=1, mtime_ns=1):
        self.failures[path] = (reason, size, mtime_ns)

    def commit(self) -> None:
        for rows, emb in self._buf:
            name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"
            buf = io.BytesIO()
            with h5py.File(buf, "w") as f:
                f.attrs.update({"format": "featcache.part", "schema_version": 1, "base_generation": self.generation,
                                "meta_json": json.dumps(self.meta, sort_keys=True)})
                f.create_dataset("embeddings", data=emb)
                f.create_dataset("paths", data=np.array(rows["paths"], dtype=object), dtype=STR)
                f.create_dataset("labels", data=np.array(rows["labels"], dtype=np.int64))
                f.create_dataset("split", data=np.array(rows["split"], dtype=object), dtype=STR)
                f.create_dataset("size", data=np.array(rows["size"], dtype=np.int64))
                f.create_dataset("mtime_ns", data=np.array(rows["mtime_ns"], dtype=np.int64))
                f.create_dataset("sha256", data=np.array(rows["sha256"], dtype=object), dtype=STR)
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            _atomic_bytes(self.parts_dir / name, buf.getbuffer())
            self.parts.append(name)
            self.part_rows.append(len(rows["paths"]))
            for i, p in enumerate(rows["paths"]):
                if p in self.where:
                    self.valid[self.where[p]] = False
                self.where[p] = len(self.valid)
                self.valid.append(True)
                self.failures.pop(p, None)
                for k in self.cols:
                    self.cols[k].append(rows[k][i])
        self._buf = []
        self.generation += 1
        self._write_index()

    def _write_index(self) -> None:
        dim, dtype, n = int(self.meta["embed_dim"]), np.dtype(self.meta["dtype"]), len(self.valid)
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.attrs.update({"format": "featcache.cache", "schema_version": 1, "generation": self.generation, "created": self.created,
                            "updated": time.time(), "meta_json": json.dumps(self.meta, sort_keys=True), "model": self.meta["model"]})
            f.create_dataset("classes", data=np.array(self.meta["classes"], dtype=object), dtype=STR)
            if n:
                layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
                offset = 0
                for name, rows in zip(self.parts, self.part_rows):
                    layout[offset : offset + rows] = h5py.VirtualSource(f"{self.parts_dir.name}/{name}", "embeddings", shape=(rows, dim))
                    offset += rows
                f.create_virtual_dataset("embeddings", layout, fillvalue=np.nan)
            else:
                f.create_dataset("embeddings", shape=(0, dim), dtype=dtype)
            f.create_dataset("valid", data=np.array(self.valid, dtype=bool))
            for k, kind in (("paths", STR), ("split", STR)):
                f.create_dataset(k, data=np.array(self.cols[k], dtype=object), dtype=kind)
            f.create_dataset("labels", data=np.array(self.cols["labels"], dtype=np.int64))
            g = f.create_group("fingerprints")
            g.create_dataset("size", data=np.array(self.cols["size"], dtype=np.int64))
            g.create_dataset("mtime_ns", data=np.array(self.cols["mtime_ns"], dtype=np.int64))
            g.create_dataset("sha256", data=np.array(self.cols["sha256"], dtype=object), dtype=STR)
            g = f.create_group("parts")
            g.create_dataset("names", data=np.array(self.parts, dtype=object), dtype=STR)
            g.create_dataset("rows", data=np.array(self.part_rows, dtype=np.int64))
            fails = sorted(self.failures.items())
            g = f.create_group("failures")
            g.create_dataset("paths", data=np.array([p for p, _ in fails], dtype=object), dtype=STR)
            g.create_dataset("reasons", data=np.array([r[0] for _, r in fails], dtype=object), dtype=STR)
            g.create_dataset("size", data=np.array([r[1] for _, r in fails], dtype=np.int64))
            g.create_dataset("mtime_ns", data=np.array([r[2] for _, r in fails], dtype=np.int64))
        _atomic_bytes(self.path, buf.getbuffer())
