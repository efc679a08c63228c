"""Writing the embedding cache: buffered rows committed as parts of constant cost.

A cache ``X.h5`` is a manifest plus ``X.h5.parts/`` (see ``manifest.py``, ``parts.py``).
A **commit** writes one new part (the buffered rows, the files that failed, and tombstones
for the older rows and failure records it replaces or deletes), then atomically replaces
the manifest. Its cost depends on the rows committed and the number of parts, never on the
cache's size: the writer finds the rows a commit replaces through its key index
(``livestate.py``), never by reading or rewriting the cache.

A writer killed at any moment loses only what it had not committed: the next writer adopts
or deletes what it left (``maintenance.py``, with compaction and repair's dedupe). Parts that
compaction retired are deleted once no live reader needs them (``leases.py``).

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
from . import maintenance
from .buffer import ChangeBuffer, PendingRow
from .columns import RowColumns, Tombstones
from .compaction import CompactionPolicy
from .known import KnownFiles, read_known_files
from .livestate import LiveState, add_deleted_counts
from .locks import WriterLock
from .manifest import Manifest, PartInfo, read_manifest, write_manifest
from .parts import new_part_name, write_part
from .schema import SCHEMA_VERSION, check_compatible, open_cache_file, parts_dir_for
from .snapshot import open_snapshot


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


class CacheWriter:
    """Buffers rows and commits them as parts (the caller holds the cache's :class:`WriterLock`,
    or uses :meth:`CacheWriter.open`, which takes it).

    ``meta`` is the provenance of this run; it must match an existing cache's (``provenance.CACHE_IDENTITY``).
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
            top, version = open_cache_file(self.path)
            top.close()
            if version < SCHEMA_VERSION:
                if staging:
                    raise CacheError(f"cache {str(self.path)!r} uses schema {version}; open it once without torchrun to migrate it")
                from .migrate import migrate_v1

                migrate_v1(self.path, meta)
            self.manifest = read_manifest(self.path)
            check_compatible(self.path, self.manifest.meta, meta)
        else:
            self.manifest = Manifest(dict(meta))
        self.live = LiveState(self.path, self.parts_dir)
        self.garbage_dirty = False  # retired parts were deleted since the manifest was written
        self._clear_buffer()
        if not staging and (self.path.exists() or self.parts_dir.is_dir()):
            maintenance.recover(self)  # also when a writer died before its first manifest: its temporaries and parts

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

    def _clear_buffer(self) -> None:
        self.buffer = ChangeBuffer(int(self._new_meta["embed_dim"]), self._new_meta["dtype"])

    # ------------------------------------------------------------------ what is there

    def known_files(self, retry: Callable[[str], bool] = lambda reason: False) -> KnownFiles:
        """Every current row's and failure's path and fingerprint (both count as done), except
        failures whose reason ``retry`` says a changed setting may cure."""
        return read_known_files(self.path, retry)

    @property
    def failures(self) -> dict[str, str]:
        """Files currently failing (committed and buffered), path -> reason."""
        if self.live.failures is not None:
            merged = {path: reason for _, _, path, reason, _, _ in self.live.failures.values()}
        elif self.path.exists():
            snap = open_snapshot(self.path)
            try:
                merged = {p: r for p, r, _, _ in snap.failure_columns().items()}
            finally:
                snap.close()
        else:
            merged = {}
        merged.update({p: r for p, (r, _, _, _) in self.buffer.failed.items()})
        for p in self.buffer.removed:
            merged.pop(p, None)
        return merged

    @property
    def n_rows(self) -> int:
        """Rows the cache holds as committed (live rows of every listed part)."""
        return self.manifest.live_rows()

    @property
    def pending(self) -> int:
        return self.buffer.n_rows

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
            self.buffer.add_rows(cols, emb)

    def set_meta(self, **values: Any) -> None:
        """Provenance to record from the next commit on (e.g. the engine that ran)."""
        self._new_meta.update(values)

    def add_failure(self, relpath: str, reason: str, size: int, mtime_ns: int) -> None:
        self.buffer.add_failure(relpath, reason, size, mtime_ns)

    def remove(self, relpaths: Sequence[str]) -> None:
        self.buffer.remove(relpaths)

    def has_changes(self) -> bool:
        return bool(self.buffer or not self.path.exists() or self._meta_changed())

    def _meta_changed(self) -> bool:
        return self.manifest.meta.get("classes") != self._new_meta.get("classes")

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
        rows, emb, fails, keys = self.buffer.resolve()
        existed = self.path.exists()
        triples: list = []
        row_hits, fail_hits = np.zeros((0, 2), np.uint64), []
        if existed and len(keys):
            self.live.ensure_index(self.manifest)
            triples, row_hits, fail_hits = self.live.supersede(keys)
        else:
            self.live.load(self.manifest)
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
        add_deleted_counts(new, tomb)
        write_manifest(self.path, new)  # the commit point
        # the commit is durable: bring the in-memory state along
        self.manifest, self.garbage_dirty = new, False
        self.live.apply_deletions(tomb)
        if info is not None:
            self.live.add_rows(info.name, rows.keys, fails, row_hits, fail_hits)
        self._clear_buffer()
        spent = time.perf_counter() - t0
        self.stats.commits += 1
        self.stats.commit_seconds += spent
        self.stats.last_commit_seconds = spent
        if self.policy.auto:
            self.compact()
        return True

    def _stage_part(self) -> bool:
        if not self.buffer.rows:
            return False
        rows, emb, _, _ = self.buffer.resolve(rows_only=True)
        meta = {**self.manifest.meta, **{k: v for k, v in self._new_meta.items() if k != "created"}}
        name = new_part_name(self.tag)
        write_part(self.parts_dir, name, rows, emb, meta=meta, base_generation=self.manifest.generation, kind="stage")
        self.staged.append(name)
        self.buffer.clear_rows()
        self.stats.commits += 1
        return True

    def take_failures(self) -> dict[str, tuple[str, int, int]]:
        """Buffered failures (relpath -> (reason, size, mtime_ns)), handed to the lock holder."""
        return self.buffer.take_failures()

    def add_failures(self, failures: dict[str, tuple[str, int, int]]) -> None:
        for p, (r, s, m) in failures.items():
            self.add_failure(p, r, s, m)

    def close(self) -> None:
        """Record garbage collected since the last commit (nothing else is pending after a commit)."""
        if self.garbage_dirty and not self.staging and self.path.exists():
            write_manifest(self.path, self.manifest)
            self.garbage_dirty = False

    # ------------------------------------------------------------------ maintenance (maintenance.py)

    def compact(self, full: bool = False) -> int:
        """Merge parts as the size-tiered policy says (``full``: everything into one part),
        streaming with a fixed memory budget. Returns how many merges ran."""
        if self.staging or not self.path.exists():
            return 0
        return maintenance.compact(self, full)

    def dedupe(self) -> int:
        """Tombstone every live row or failure record whose path also lives in a newer part (a
        manifest rebuilt from parts may list both). Returns how many were superseded."""
        return maintenance.dedupe(self)
