"""Writing the embedding cache (the store is the only package that imports h5py).

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

import io
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from ..choices import DTYPES
from ..errors import CacheError
from .atomic import remove_stale_temporaries, write_bytes_atomically
from .reader import iter_embeddings
from .schema import FORMAT, PART_FORMAT, SCHEMA_VERSION, STR, check_compatible, check_parts_present, open_index, parts_dir_for, read_strings, same_backbone_rows

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
    with open_index(path) as f:
        st = _IndexState(json.loads(f.attrs["meta_json"]))
        st.parts = read_strings(f["parts/names"])
        st.part_rows = [int(x) for x in f["parts/rows"][...]]
        st.paths = read_strings(f["paths"])
        st.labels = [int(x) for x in f["labels"][...]]
        st.split = read_strings(f["split"])
        st.size = [int(x) for x in f["fingerprints/size"][...]]
        st.mtime_ns = [int(x) for x in f["fingerprints/mtime_ns"][...]]
        st.sha256 = read_strings(f["fingerprints/sha256"])
        st.valid = [bool(x) for x in f["valid"][...]]
        fp, fr = read_strings(f["failures/paths"]), read_strings(f["failures/reasons"])
        fs, fm = f["failures/size"][...], f["failures/mtime_ns"][...]
        st.failures = {p: (r, int(s), int(m)) for p, r, s, m in zip(fp, fr, fs, fm)}
        st.created = float(f.attrs.get("created", time.time()))
        st.generation = int(f.attrs.get("generation", 0))
    check_parts_present(path, st.parts)
    return st


@contextmanager
def _new_hdf5(final: Path) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written atomically with plain writes: a full disk
    is then a clean OSError (exit 6), where HDF5's own writer, after ENOSPC half-way, raised
    RuntimeErrors and could crash the interpreter on closing the file."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_bytes_atomically(final, buffer.getbuffer())  # checks free space for exactly these bytes first


def _write_index(path: Path, st: _IndexState) -> None:
    meta = st.meta
    dim, dtype = int(meta["embed_dim"]), np.dtype(meta["dtype"])
    n = len(st.paths)
    with _new_hdf5(path) as f:
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
    with _new_hdf5(folder / name) as f:
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
            if not same_backbone_rows(meta, state.meta):
                return None
            rows = {"paths": read_strings(f["paths"]), "labels": [int(x) for x in f["labels"][...]], "split": read_strings(f["split"]),
                    "size": [int(x) for x in f["size"][...]], "mtime_ns": [int(x) for x in f["mtime_ns"][...]], "sha256": read_strings(f["sha256"])}
    except (OSError, KeyError, ValueError):
        return None
    part_classes, classes = list(meta.get("classes", [])), list(state.meta.get("classes", []))
    if part_classes != classes:  # labels follow class names, as in commit()
        pos = {c: i for i, c in enumerate(classes)}
        rows["labels"] = [pos.get(part_classes[l], -1) if l >= 0 else -1 for l in rows["labels"]]
    return rows


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
    def known(self, retry: Callable[[str], bool] = lambda reason: False) -> dict[str, tuple[int, int]]:
        """relpath -> (size, mtime_ns) of rows and of recorded failures (both count as done),
        except failures whose reason ``retry`` says a changed setting may cure."""
        st = self.state
        out = {st.paths[i]: (st.size[i], st.mtime_ns[i]) for i in st.current().values()}
        out.update({p: (s, m) for p, (reason, s, m) in st.failures.items() if not retry(reason)})
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
