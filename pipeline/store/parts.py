"""Part files: self-describing, immutable, checksummed sets of rows.

A part holds the rows of one commit (or of a merge of older parts): embeddings, paths,
labels (with the class names they index, in its ``meta_json``), split, fingerprints and
path keys; the files that failed in that commit; and the *tombstones* the commit records
against rows of older parts it replaces or deletes. Nothing in a part is ever rewritten:
compaction writes a new part and retires the old ones.

Layout (every dataset chunked with Fletcher-32)::

    embeddings [n, D]   paths [n] utf-8   labels [n] int32   split [n] uint8 (attr codes)
    size, mtime_ns [n] int64   sha256 [n, 32] uint8   key [n, 2] uint64 (BLAKE2b-128 of the path)
    failures/{paths, reasons, size, mtime_ns, key}
    deletes/{targets [t] utf-8, target [d] int32, kind [d] uint8 (0 row, 1 failure), row [d] int64}
    attrs: format, schema_version, name, kind (commit|stage|merge|migrate), base_generation,
           created, meta_json, inputs_json (the parts a merge replaced), rows, failures
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError, DamagedCacheError, command_hint
from .columns import SPLITS, FailureColumns, RowColumns, Tombstones
from .h5files import WrittenFile, create, file_sha256, hdf5_overhead, new_hdf5, put, utf8_dtype
from .manifest import PartInfo
from .schema import PART_FORMAT, SCHEMA_VERSION
from .seal import SealError, check_file

ROW_COLUMNS = {"paths": "paths", "labels": "labels", "split": "split", "size": "size", "mtime_ns": "mtime_ns", "sha256": "sha256", "keys": "key"}
FAILURE_COLUMNS = {"paths": "paths", "reasons": "reasons", "size": "size", "mtime_ns": "mtime_ns", "keys": "key"}
KINDS = ("commit", "stage", "merge", "migrate")
ADOPTABLE = ("commit", "stage")  # an unlisted merge/migrate output is a leftover: its inputs still hold its rows
# what h5py and HDF5 raise on damaged bytes: checksum mismatch (OSError), bad object headers
# (KeyError), impossible sizes and types (ValueError, TypeError), library state (RuntimeError)
DAMAGE = (OSError, KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError)


def new_part_name(tag: str = "") -> str:
    return f"part-{time.strftime('%Y%m%dT%H%M%S')}-{tag}{os.getpid()}-{uuid.uuid4().hex[:12]}.h5"


def damaged(cache: Path, name: str, exc: BaseException | str) -> DamagedCacheError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return DamagedCacheError(
        f"cache {str(cache)!r}: part {name} is damaged ({detail}); its rows cannot be trusted. "
        f"`{command_hint(f'verify {cache}')}` lists every damaged part; re-run your extract command with --repair "
        "to drop the damaged rows and extract those images again", parts=(name,))


def row_bytes(dim: int, dtype: np.dtype, path_width: int) -> int:
    return dim * np.dtype(dtype).itemsize + path_width + 4 + 1 + 8 + 8 + 32 + 16


def part_reserve(n_rows: int, dim: int, dtype, path_width: int, failures: FailureColumns | None, n_tombstones: int) -> int:
    """Upper bound of a part's size on disk (its space is reserved before HDF5 writes)."""
    data = n_rows * row_bytes(dim, dtype, path_width)
    if failures is not None and len(failures):
        data += len(failures) * (failures.paths.dtype.itemsize + failures.reasons.dtype.itemsize + 32)
    data += n_tombstones * 16 + 4096
    return int(data * 1.02) + hdf5_overhead(20, data // (64 << 10) + 40)


class PartSink:
    """Write a part whose row count is known up front, in slices (merges stream through it
    with bounded memory; a commit writes it in one slice)."""

    def __init__(self, folder: Path, name: str, *, n_rows: int, dim: int, dtype, path_width: int, meta: dict[str, Any],
                 base_generation: int, kind: str, failures: FailureColumns | None = None, tombstones: Tombstones | None = None,
                 inputs: Sequence[str] = ()):
        self.final = Path(folder) / name
        self.name, self.n_rows, self.written = name, n_rows, 0
        tombstones = tombstones if tombstones is not None else Tombstones.empty()
        failures = failures if failures is not None else FailureColumns.build([])
        self._ctx = new_hdf5(self.final, part_reserve(n_rows, dim, dtype, path_width, failures, len(tombstones)))
        self.f, self.result = self._ctx.__enter__()
        try:
            f = self.f
            f.attrs.update({"format": PART_FORMAT, "schema_version": SCHEMA_VERSION, "name": name, "kind": kind,
                            "base_generation": int(base_generation), "created": time.time(), "meta_json": json.dumps(meta, sort_keys=True),
                            "inputs_json": json.dumps(list(inputs)), "rows": int(n_rows), "failures": len(failures)})
            self.ds = {
                "embeddings": create(f, "embeddings", (n_rows, dim), dtype),
                "paths": create(f, "paths", (n_rows,), utf8_dtype(path_width), compress=True),
                "labels": create(f, "labels", (n_rows,), np.int32),
                "split": create(f, "split", (n_rows,), np.uint8),
                "size": create(f, "size", (n_rows,), np.int64),
                "mtime_ns": create(f, "mtime_ns", (n_rows,), np.int64),
                "sha256": create(f, "sha256", (n_rows, 32), np.uint8),
                "key": create(f, "key", (n_rows, 2), np.uint64),
            }
            self.ds["split"].attrs["codes"] = json.dumps(list(SPLITS))
            g = f.create_group("failures")
            for attr, ds in FAILURE_COLUMNS.items():
                put(g, ds, getattr(failures, attr), compress=attr in ("paths", "reasons"))
            g = f.create_group("deletes")
            put(g, "targets", np.array([t.encode() for t in tombstones.targets], dtype="S") if tombstones.targets else np.zeros(0, "S1"))
            put(g, "target", tombstones.target_index)
            put(g, "kind", tombstones.kind)
            put(g, "row", tombstones.row)
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def append(self, rows: RowColumns, embeddings: np.ndarray) -> None:
        n = len(rows)
        if not n:
            return
        a, b = self.written, self.written + n
        if b > self.n_rows:
            raise ValueError(f"part {self.name}: {b} rows written into a part sized for {self.n_rows}")
        self.ds["embeddings"][a:b] = embeddings
        self.ds["paths"][a:b] = rows.paths.astype(self.ds["paths"].dtype)
        for attr in ("labels", "split", "size", "mtime_ns", "sha256"):
            self.ds[attr][a:b] = getattr(rows, attr)
        self.ds["key"][a:b] = rows.keys
        self.written = b

    def close(self) -> WrittenFile:
        if self.written != self.n_rows:
            exc = ValueError(f"part {self.name}: {self.written} of {self.n_rows} rows written")
            self._ctx.__exit__(ValueError, exc, None)
            raise exc
        self._ctx.__exit__(None, None, None)
        return self.result

    def abort(self, exc: BaseException) -> None:
        try:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass


def write_part(folder: Path, name: str, rows: RowColumns, embeddings: np.ndarray, *, meta: dict[str, Any], base_generation: int,
               kind: str, failures: FailureColumns | None = None, tombstones: Tombstones | None = None) -> WrittenFile:
    """One complete part file, atomically (the rows of one commit)."""
    sink = PartSink(folder, name, n_rows=len(rows), dim=int(meta["embed_dim"]), dtype=meta["dtype"], path_width=rows.paths.dtype.itemsize,
                    meta=meta, base_generation=base_generation, kind=kind, failures=failures, tombstones=tombstones)
    try:
        sink.append(rows, embeddings)
    except BaseException as exc:
        sink.abort(exc)
        raise
    return sink.close()


class PartFile:
    """A part opened for reading: its seal is checked before h5py sees a byte (against what
    the manifest recorded, when ``listed`` is its entry there), and every chunk read is
    checked by Fletcher-32; damage is a :class:`DamagedCacheError` naming the part, never
    wrong numbers or labels."""

    def __init__(self, cache: Path, folder: Path, name: str, listed: PartInfo | None = None):
        self.cache, self.name = Path(cache), name
        self.path = Path(folder) / name
        with self.guard():
            try:
                if listed is not None:
                    check_file(self.path, size=listed.bytes or None, sha256=listed.sha256, frame=listed.frame)
                else:
                    check_file(self.path)
            except SealError as exc:
                raise damaged(self.cache, name, str(exc)) from None
            self.f = h5py.File(self.path, "r")
            attrs = self.f.attrs
            if attrs.get("format") != PART_FORMAT or int(attrs.get("schema_version", 0)) != SCHEMA_VERSION:
                raise damaged(self.cache, name, f"not a schema-{SCHEMA_VERSION} part file")
            if attrs.get("name") != name:
                raise damaged(self.cache, name, f"the file says it is part {attrs.get('name')!r}")
            self.meta: dict[str, Any] = json.loads(attrs["meta_json"])
            self.kind = str(attrs["kind"])
            self.base_generation = int(attrs["base_generation"])
            self.created = float(attrs.get("created", 0.0))
            self.inputs: list[str] = json.loads(attrs.get("inputs_json", "[]"))
            self.n_rows = int(attrs["rows"])
            self.n_failures = int(attrs["failures"])
            if self.f["embeddings"].shape[0] != self.n_rows or self.f["failures/paths"].shape[0] != self.n_failures:
                raise damaged(self.cache, name, "row counts disagree with the header")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Translate h5py's errors on this part into one clear CacheError."""
        try:
            yield
        except (CacheError, MemoryError):
            raise
        except FileNotFoundError:
            raise CacheError(f"cache {str(self.cache)!r} is missing its part file {str(self.path)!r}; the cache was moved without "
                             "its .parts folder (move both) or the part was deleted — re-run your extract command with --repair") from None
        except DAMAGE as exc:
            raise damaged(self.cache, self.name, exc) from None

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    @property
    def path_width(self) -> int:
        return self.f["paths"].dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored embedding row."""
        ds = self.f["embeddings"]
        return int(ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))

    def columns(self, rows: slice | np.ndarray = slice(None)) -> RowColumns:
        with self.guard():
            out = {attr: self.f[ds][rows] for attr, ds in ROW_COLUMNS.items()}
        return RowColumns(**out)

    def column(self, attr: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        with self.guard():
            return self.f[ROW_COLUMNS[attr]][rows]

    def embeddings(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        with self.guard():
            return self.f["embeddings"][rows]

    def read_direct(self, out: np.ndarray, start: int, n: int, dest: int) -> None:
        """Embedding rows ``start:start+n`` decoded straight into ``out[dest:dest+n]``."""
        with self.guard():
            self.f["embeddings"].read_direct(out, np.s_[start : start + n], np.s_[dest : dest + n])

    def failures(self) -> FailureColumns:
        with self.guard():
            g = self.f["failures"]
            return FailureColumns(**{attr: g[ds][...] for attr, ds in FAILURE_COLUMNS.items()})

    def tombstones(self) -> Tombstones:
        with self.guard():
            g = self.f["deletes"]
            targets = [t.decode() for t in g["targets"][...].tolist()]
            t = Tombstones(targets, g["target"][...].astype(np.int32), g["kind"][...].astype(np.uint8), g["row"][...].astype(np.int64))
            if len(t) and (t.target_index.min() < 0 or t.target_index.max() >= len(targets)):
                raise damaged(self.cache, self.name, "tombstones name targets that are not listed")
            return t

    def read_all(self) -> None:
        """Read every dataset once (what ``verify`` does beyond the file digest)."""
        with self.guard():
            def visit(_name, obj):
                if isinstance(obj, h5py.Dataset):
                    step = max(1, (64 << 20) // max(obj.dtype.itemsize * int(np.prod(obj.shape[1:])), 1))
                    for start in range(0, obj.shape[0], step):
                        obj[start : start + step]
            self.f.visititems(visit)

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass


def entry_for(path: Path, rows: int, failures: int, tombstones: int) -> PartInfo:
    """The manifest entry of a complete part found on disk (checked by :func:`peek_part`)."""
    seal = check_file(path, full=True)
    digest = seal.content if seal is not None else file_sha256(path)
    return PartInfo(path.name, rows, failures=failures, tombstones=tombstones, bytes=path.stat().st_size, sha256=digest,
                    frame=seal.frame if seal is not None else "")


def peek_part(path: Path) -> dict[str, Any] | None:
    """The header of a part file no manifest lists (for adoption, or a rebuilt manifest), or
    None when it is not one, or any of its bytes differs from what was sealed: a damaged part
    is never listed again."""
    try:
        check_file(path, full=True)
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format") != PART_FORMAT:
                return None
            return {"schema_version": int(a.get("schema_version", 0)), "kind": str(a.get("kind", "")), "name": str(a.get("name", "")),
                    "base_generation": int(a.get("base_generation", -1)), "created": float(a.get("created", 0.0)),
                    "meta": json.loads(a["meta_json"]), "inputs": json.loads(a.get("inputs_json", "[]"))}
    except (*DAMAGE, OSError, SealError):
        return None
