"""The embedding cache: the only module that imports h5py.

On disk a cache ``X.h5`` is an *index* file plus a folder ``X.h5.parts/`` of *part*
files. Each part holds the rows of one commit (embeddings and per-row metadata) and is
written atomically (temporary name, fsync, rename). The index lists the committed parts
and carries all per-row metadata, a ``valid`` mask (the newest row of each file still on
disk) and a virtual dataset ``embeddings`` that maps every part's rows in order, so plain
h5py reads the whole cache from the one file:

    with h5py.File("X.h5") as f:
        keep = f["valid"][:]
        X, y = f["embeddings"][:][keep], f["labels"][:][keep]

A commit is: write the part, then atomically replace the index. A writer killed between
the two leaves an orphan part that the next writer deletes; committed data is never
touched. The schema (below) is versioned by ``SCHEMA_VERSION``; see README "Cache format".
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .atomic import atomic_path, remove_stale_temporaries
from .errors import CacheError, IncompatibleError

FORMAT = "featcache.cache"
PART_FORMAT = "featcache.part"
SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
DTYPES = ("float32", "float16")
# Provenance keys that must be equal for rows to share one cache.
COMPAT_KEYS = ("model", "weights", "preprocessing", "embed_dim", "dtype", "precision", "decode", "data_root", "layout")
# What a cache written before a key existed holds.
COMPAT_DEFAULTS = {"precision": "fp32", "decode": "exact"}


def parts_dir_for(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


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


def _open_index(path: Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache {str(path)!r} does not exist; create it with `python cli.py extract DATA_DIR --model NAME --out {path}`")
    if path.is_dir():
        raise CacheError(f"cache {str(path)!r} is a folder; pass the .h5 index file written by extract")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{str(path)!r} is not a readable HDF5 file (truncated or corrupt: {str(exc).splitlines()[0][:100]}); re-run extract with a new --out") from exc
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        f.close()
        raise CacheError(f"{str(path)!r} is an HDF5 file but not a featcache cache (format={fmt!r}); pass a file written by `extract`")
    version = int(f.attrs.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        f.close()
        raise CacheError(f"{str(path)!r} uses cache schema {version}, newer than this featcache understands ({SCHEMA_VERSION}); upgrade featcache")
    return f


def _strs(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[...]) if ds.shape[0] else []


def _check_parts_present(path: Path, names: Sequence[str]) -> None:
    folder = parts_dir_for(path)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CacheError(f"cache {str(path)!r} is missing {len(missing)} part file(s) in {str(folder)!r} (e.g. {missing[0]}); the cache was moved without its .parts folder — move both, or re-extract")


def read_cache_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance of a cache without reading its rows."""
    with _open_index(Path(path)) as f:
        return json.loads(f.attrs["meta_json"])


def read_index_info(path: str | os.PathLike) -> dict[str, Any]:
    """Failures, last update time and part count of a cache (no rows, no embeddings)."""
    with _open_index(Path(path)) as f:
        return {
            "failures": list(zip(_strs(f["failures/paths"]), _strs(f["failures/reasons"]))),
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
    with _open_index(path) as f:
        meta = json.loads(f.attrs["meta_json"])
        _check_parts_present(path, _strs(f["parts/names"]))
        valid = f["valid"][...].astype(bool)
        all_paths = np.array(_strs(f["paths"]), dtype=object)
        all_split = np.array(_strs(f["split"]), dtype=object)
        labels = f["labels"][...].astype(np.int64)
        fingerprints = {
            "size": f["fingerprints/size"][...],
            "mtime_ns": f["fingerprints/mtime_ns"][...],
            "sha256": np.array(_strs(f["fingerprints/sha256"]), dtype=object),
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
    with _open_index(Path(path)) as f:
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


# ----------------------------------------------------------------------------- writing


@dataclass
class _IndexState:
    """In-memory copy of the index (the single writer owns it while holding the lock)."""

    meta: dict[str, Any]
    parts: list[str] = field(default_factory=list)
    part_rows: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    failures: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # path -> (reason, size, mtime)
    created: float = field(default_factory=time.time)
    generation: int = 0

    def current(self) -> dict[str, int]:
        """relative path -> index position of its valid row."""
        return {p: i for i, (p, v) in enumerate(zip(self.paths, self.valid)) if v}

    def copy(self) -> "_IndexState":
        return _IndexState(
            dict(self.meta), list(self.parts), list(self.part_rows), list(self.paths), list(self.labels), list(self.split),
            list(self.size), list(self.mtime_ns), list(self.sha256), list(self.valid), dict(self.failures), self.created, self.generation,
        )


def _load_state(path: Path) -> _IndexState:
    with _open_index(path) as f:
        st = _IndexState(json.loads(f.attrs["meta_json"]))
        st.parts = _strs(f["parts/names"])
        st.part_rows = [int(x) for x in f["parts/rows"][...]]
        st.paths = _strs(f["paths"])
        st.labels = [int(x) for x in f["labels"][...]]
        st.split = _strs(f["split"])
        st.size = [int(x) for x in f["fingerprints/size"][...]]
        st.mtime_ns = [int(x) for x in f["fingerprints/mtime_ns"][...]]
        st.sha256 = _strs(f["fingerprints/sha256"])
        st.valid = [bool(x) for x in f["valid"][...]]
        fp, fr = _strs(f["failures/paths"]), _strs(f["failures/reasons"])
        fs, fm = f["failures/size"][...], f["failures/mtime_ns"][...]
        st.failures = {p: (r, int(s), int(m)) for p, r, s, m in zip(fp, fr, fs, fm)}
        st.created = float(f.attrs.get("created", time.time()))
        st.generation = int(f.attrs.get("generation", 0))
    _check_parts_present(path, st.parts)
    return st


def _write_index(path: Path, st: _IndexState) -> None:
    meta = st.meta
    dim, dtype = int(meta["embed_dim"]), np.dtype(meta["dtype"])
    n = len(st.paths)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["generation"] = st.generation
            f.attrs["created"] = st.created
            f.attrs["updated"] = time.time()
            f.attrs["meta_json"] = json.dumps(meta, sort_keys=True)
            for key in ("model", "weights", "embed_dim", "dtype", "data_root", "layout", "featcache_version", "torch_version", "torchvision_version"):
                if key in meta and meta[key] is not None:
                    f.attrs[key] = meta[key] if isinstance(meta[key], (int, float)) else str(meta[key])
            f.attrs["preprocessing_json"] = json.dumps(meta["preprocessing"], sort_keys=True)
            f.create_dataset("classes", data=np.array(meta["classes"], dtype=object), dtype=STR)
            if n:
                layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
                offset = 0
                rel_dir = parts_dir_for(path).name
                for name, rows in zip(st.parts, st.part_rows):
                    layout[offset : offset + rows] = h5py.VirtualSource(f"{rel_dir}/{name}", "embeddings", shape=(rows, dim))
                    offset += rows
                f.create_virtual_dataset("embeddings", layout, fillvalue=np.nan)
            else:
                f.create_dataset("embeddings", shape=(0, dim), dtype=dtype)
            f.create_dataset("valid", data=np.array(st.valid, dtype=bool))
            f.create_dataset("paths", data=np.array(st.paths, dtype=object), dtype=STR)
            f.create_dataset("labels", data=np.array(st.labels, dtype=np.int64))
            f.create_dataset("split", data=np.array(st.split, dtype=object), dtype=STR)
            g = f.create_group("fingerprints")
            g.create_dataset("size", data=np.array(st.size, dtype=np.int64))
            g.create_dataset("mtime_ns", data=np.array(st.mtime_ns, dtype=np.int64))
            g.create_dataset("sha256", data=np.array(st.sha256, dtype=object), dtype=STR)
            g = f.create_group("parts")
            g.create_dataset("names", data=np.array(st.parts, dtype=object), dtype=STR)
            g.create_dataset("rows", data=np.array(st.part_rows, dtype=np.int64))
            fails = sorted(st.failures.items())
            g = f.create_group("failures")
            g.create_dataset("paths", data=np.array([p for p, _ in fails], dtype=object), dtype=STR)
            g.create_dataset("reasons", data=np.array([r[0] for _, r in fails], dtype=object), dtype=STR)
            g.create_dataset("size", data=np.array([r[1] for _, r in fails], dtype=np.int64))
            g.create_dataset("mtime_ns", data=np.array([r[2] for _, r in fails], dtype=np.int64))


def _write_part(folder: Path, meta: dict[str, Any], rows: dict[str, Any], emb: np.ndarray, base_generation: int, tag: str = "") -> str:
    """One complete part file (atomic). ``base_generation`` is the index generation it was
    written against: a part no index names yet is adopted by the next writer when it is at
    least the index's generation (a writer or rank died after writing it), and deleted when
    older (left over by a compaction that replaced it)."""
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"
    with atomic_path(folder / name) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = PART_FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["base_generation"] = base_generation
            f.attrs["meta_json"] = json.dumps(meta, sort_keys=True)
            f.create_dataset("embeddings", data=emb)
            f.create_dataset("paths", data=np.array(rows["paths"], dtype=object), dtype=STR)
            f.create_dataset("labels", data=np.array(rows["labels"], dtype=np.int64))
            f.create_dataset("split", data=np.array(rows["split"], dtype=object), dtype=STR)
            f.create_dataset("size", data=np.array(rows["size"], dtype=np.int64))
            f.create_dataset("mtime_ns", data=np.array(rows["mtime_ns"], dtype=np.int64))
            f.create_dataset("sha256", data=np.array(rows["sha256"], dtype=object), dtype=STR)
    return name


def _read_orphan(entry: Path, state: _IndexState) -> dict[str, list] | None:
    """The rows of an unindexed part if it should be adopted into ``state``, else None."""
    try:
        with h5py.File(entry, "r") as f:
            if f.attrs.get("format") != PART_FORMAT or int(f.attrs.get("base_generation", -1)) < state.generation:
                return None
            meta = json.loads(f.attrs["meta_json"])
            if any(meta.get(k) != state.meta.get(k) for k in COMPAT_KEYS):
                return None
            rows = {"paths": _strs(f["paths"]), "labels": [int(x) for x in f["labels"][...]], "split": _strs(f["split"]),
                    "size": [int(x) for x in f["size"][...]], "mtime_ns": [int(x) for x in f["mtime_ns"][...]], "sha256": _strs(f["sha256"])}
    except (OSError, KeyError, ValueError):
        return None
    part_classes, classes = list(meta.get("classes", [])), list(state.meta.get("classes", []))
    if part_classes != classes:  # labels follow class names, as in commit()
        pos = {c: i for i, c in enumerate(classes)}
        rows["labels"] = [pos.get(part_classes[l], -1) if l >= 0 else -1 for l in rows["labels"]]
    return rows


def check_compatible(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse to mix rows of different backbones, weights, preprocessing, dtype or data roots."""
    for key in COMPAT_KEYS:
        held, wanted = have.get(key, COMPAT_DEFAULTS.get(key)), want.get(key, COMPAT_DEFAULTS.get(key))
        if held != wanted:
            raise IncompatibleError(
                f"cache {str(path)!r} holds {key}={held!r} but this run has {key}={wanted!r}; "
                "use another --out (the default path is derived from model and weights) or delete the cache"
            )


@dataclass
class PendingRow:
    relpath: str
    label: int
    split: str
    size: int
    mtime_ns: int
    sha256: str


class CacheWriter:
    """Buffers rows and commits them as parts (the caller holds the cache's WriterLock).

    ``meta`` is the provenance of this run; it must match an existing cache's
    (:data:`COMPAT_KEYS`). ``meta['classes']`` may differ: labels are remapped by name.
    """

    def __init__(self, path: Path, meta: dict[str, Any], staging: bool = False, tag: str = ""):
        """``staging=True``: write parts only, never the index, and leave others' parts alone —
        for torchrun ranks, whose parts the rank holding the lock adopts at the end (by
        opening a normal writer). ``tag`` goes into part names (e.g. ``rank1-``)."""
        self.path = Path(path)
        self.parts_dir = parts_dir_for(self.path)
        self.staging, self.tag = staging, tag
        self.adopted = 0
        if meta.get("dtype") not in DTYPES:
            raise CacheError(f"--dtype {meta.get('dtype')!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.path.exists():
            self.state = _load_state(self.path)
            check_compatible(self.path, self.state.meta, meta)
            if not staging:
                self._adopt_or_clean_orphans()
        else:
            self.state = _IndexState(dict(meta))
        self._new_meta = dict(meta)
        self._rows: list[PendingRow] = []
        self._emb: list[np.ndarray] = []
        self._fail: dict[str, tuple[str, int, int]] = {}
        self._removed: set[str] = set()
        self.staged: list[str] = []
        self.commits = 0

    # -- what is there
    def known(self) -> dict[str, tuple[int, int]]:
        """relpath -> (size, mtime_ns) of rows and of recorded failures (both count as done)."""
        st = self.state
        out = {st.paths[i]: (st.size[i], st.mtime_ns[i]) for i in st.current().values()}
        out.update({p: (s, m) for p, (_, s, m) in st.failures.items()})
        return out

    @property
    def failures(self) -> dict[str, str]:
        merged = {p: r for p, (r, _, _) in self.state.failures.items()}
        merged.update({p: r for p, (r, _, _) in self._fail.items()})
        return {p: r for p, r in merged.items() if p not in self._removed}

    @property
    def pending(self) -> int:
        return len(self._rows)

    # -- changes
    def add(self, rows: Sequence[PendingRow], embeddings: np.ndarray) -> None:
        if len(rows) != len(embeddings):
            raise ValueError("rows and embeddings differ in length")
        if len(rows):
            self._rows.extend(rows)
            self._emb.append(np.asarray(embeddings, dtype=self._new_meta["dtype"]))

    def set_meta(self, **values: Any) -> None:
        """Provenance to record from the next commit on (e.g. the engine that ran)."""
        self._new_meta.update(values)

    def add_failure(self, relpath: str, reason: str, size: int, mtime_ns: int) -> None:
        self._fail[relpath] = (reason, size, mtime_ns)

    def remove(self, relpaths: Sequence[str]) -> None:
        self._removed.update(relpaths)

    def has_changes(self) -> bool:
        return bool(self._rows or self._fail or self._removed or not self.path.exists() or self._meta_changed())

    def _meta_changed(self) -> bool:
        return self.state.meta.get("classes") != self._new_meta.get("classes")

    def commit(self) -> bool:
        """Make everything buffered durable (one part + one index replace). Returns False if nothing to do.

        A staging writer writes the part only; failures and removals stay buffered for the
        lock holder (``take_failures``)."""
        if self.staging:
            return self._stage_part()
        if not self.has_changes():
            return False
        new = self.state.copy()
        old_classes = list(new.meta.get("classes", []))
        new.meta.update({k: v for k, v in self._new_meta.items() if k not in ("created",)})
        new.meta["classes"] = list(self._new_meta["classes"])
        if old_classes != new.meta["classes"]:  # class folders added/removed: remap labels by name
            pos = {c: i for i, c in enumerate(new.meta["classes"])}
            new.labels = [pos.get(old_classes[l], -1) if l >= 0 else -1 for l in new.labels]
        current = new.current()
        if self._rows:
            emb = np.concatenate(self._emb)
            rows = self._pending_columns()
            name = _write_part(self.parts_dir, new.meta, rows, emb, self.state.generation, self.tag)
            new.parts.append(name)
            new.part_rows.append(len(self._rows))
            for r in self._rows:
                if r.relpath in current:
                    new.valid[current[r.relpath]] = False
                current[r.relpath] = len(new.paths)
                new.paths.append(r.relpath)
                new.labels.append(r.label)
                new.split.append(r.split)
                new.size.append(r.size)
                new.mtime_ns.append(r.mtime_ns)
                new.sha256.append(r.sha256)
                new.valid.append(True)
                new.failures.pop(r.relpath, None)
        for p, fail in self._fail.items():
            if p in current:  # the file changed and is now unreadable: its old row is stale
                new.valid[current.pop(p)] = False
            new.failures[p] = fail
        for p in self._removed:
            if p in current:
                new.valid[current.pop(p)] = False
            new.failures.pop(p, None)
        new.generation += 1
        _write_index(self.path, new)
        self.state = new
        self._rows, self._emb, self._fail, self._removed = [], [], {}, set()
        self.commits += 1
        return True

    def _pending_columns(self) -> dict[str, list]:
        return {
            "paths": [r.relpath for r in self._rows], "labels": [r.label for r in self._rows],
            "split": [r.split for r in self._rows], "size": [r.size for r in self._rows],
            "mtime_ns": [r.mtime_ns for r in self._rows], "sha256": [r.sha256 for r in self._rows],
        }

    def _stage_part(self) -> bool:
        if not self._rows:
            return False
        meta = {**self.state.meta, **{k: v for k, v in self._new_meta.items() if k != "created"}}
        rows = self._pending_columns()
        self.staged.append(_write_part(self.parts_dir, meta, rows, np.concatenate(self._emb), self.state.generation, self.tag))
        self._rows, self._emb = [], []
        self.commits += 1
        return True

    def take_failures(self) -> dict[str, tuple[str, int, int]]:
        """Buffered failures (relpath -> (reason, size, mtime_ns)), handed to the lock holder."""
        out, self._fail = dict(self._fail), {}
        return out

    def add_failures(self, failures: dict[str, tuple[str, int, int]]) -> None:
        self._fail.update(failures)

    # -- housekeeping
    def _adopt_or_clean_orphans(self) -> None:
        """Parts no index names: adopt complete ones written against this index (a writer or a
        torchrun rank died before the index named them: their rows are kept), delete the rest
        (compaction leftovers, other backbones), and delete temporaries of killed writers."""
        remove_stale_temporaries(self.path.parent, self.path.name)
        remove_stale_temporaries(self.parts_dir)
        if not self.parts_dir.is_dir():
            return
        keep = set(self.state.parts)
        new = self.state.copy()
        adopted = []
        for entry in sorted(self.parts_dir.glob("part-*.h5")):
            if entry.name in keep:
                continue
            rows = _read_orphan(entry, new)
            if rows is None:
                entry.unlink(missing_ok=True)
                continue
            current = new.current()
            new.parts.append(entry.name)
            new.part_rows.append(len(rows["paths"]))
            for i, p in enumerate(rows["paths"]):
                if p in current:
                    new.valid[current[p]] = False
                current[p] = len(new.paths)
                new.paths.append(p)
                for key in ("labels", "split", "size", "mtime_ns", "sha256"):
                    getattr(new, key).append(rows[key][i])
                new.valid.append(True)
                new.failures.pop(p, None)
            adopted.append(entry.name)
        if adopted:
            new.generation += 1
            _write_index(self.path, new)
            self.state = new
            self.adopted = sum(new.part_rows[-len(adopted):])

    def compact(self, min_parts: int = 32, min_invalid_fraction: float = 0.25) -> bool:
        """Rewrite all valid rows into one part when parts pile up or many rows are stale."""
        st = self.state
        n, n_valid = len(st.valid), sum(st.valid)
        if not n or (len(st.parts) < min_parts and (n - n_valid) < min_invalid_fraction * n):
            return False
        keep = np.flatnonzero(np.array(st.valid, dtype=bool))
        emb = np.empty((len(keep), int(st.meta["embed_dim"])), dtype=st.meta["dtype"])
        for pos, block in iter_embeddings(self.path, keep):
            emb[pos] = block
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        rows = {"paths": pick(st.paths), "labels": pick(st.labels), "split": pick(st.split),
                "size": pick(st.size), "mtime_ns": pick(st.mtime_ns), "sha256": pick(st.sha256)}
        new = st.copy()
        new.parts = [_write_part(self.parts_dir, st.meta, rows, emb, st.generation)] if len(keep) else []
        new.part_rows = [len(keep)] if len(keep) else []
        new.paths, new.labels, new.split = rows["paths"], rows["labels"], rows["split"]
        new.size, new.mtime_ns, new.sha256 = rows["size"], rows["mtime_ns"], rows["sha256"]
        new.valid = [True] * len(keep)
        new.generation += 1
        _write_index(self.path, new)
        old = set(st.parts) - set(new.parts)
        self.state = new
        for name in old:
            (self.parts_dir / name).unlink(missing_ok=True)
        return True


def cache_disk_bytes(path: Path) -> int:
    total = path.stat().st_size if path.exists() else 0
    folder = parts_dir_for(path)
    if folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total
