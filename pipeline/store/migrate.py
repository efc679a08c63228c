"""Schema 1 -> schema 2, done by the first writer that opens a schema-1 cache.

The current rows (and those of complete commits the old index lost, which a schema-1
writer would have adopted) are streamed into one schema-2 part, with bounded memory; then
the new manifest replaces the old index in one rename — the migration's commit point. A
kill before it leaves the schema-1 cache as it was (the half-written part is a temporary, or
an unlisted ``migrate`` part the next writer deletes); after it, the old files are retired
like any compacted part.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .columns import FailureColumns
from .compaction import CompactionPolicy
from .legacy import read_v1_part, read_v1_rows, v1_orphans
from .manifest import Manifest, PartInfo, write_manifest
from .parts import PartSink, new_part_name, row_bytes
from .schema import check_compatible
from .snapshot import open_snapshot


def migrate_v1(path: Path, meta: dict[str, Any], memory_budget: int = CompactionPolicy().memory_budget) -> None:
    """Rewrite the schema-1 cache at ``path`` as schema 2 (the caller holds the writer lock)."""
    snap = open_snapshot(path)
    try:
        check_compatible(path, snap.meta, meta)  # refuse before writing anything
        ids, cols, failures = read_v1_rows(snap)
        adopt, stale = v1_orphans(snap, snap.meta)
        classes = list(snap.meta.get("classes", []))
        extra = [read_v1_part(p, classes) for p in adopt]  # single commits: small
        # later rows of a path win: orphans over the index, later orphans over earlier ones
        all_keys = np.concatenate([cols.keys] + [c.keys for c, _ in extra]).reshape(-1, 2)
        order = np.lexsort((np.arange(len(all_keys)), all_keys[:, 1], all_keys[:, 0]))
        ks = all_keys[order]
        last = np.ones(len(order), bool)
        last[:-1] = (ks[1:] != ks[:-1]).any(axis=1)
        keep = np.zeros(len(all_keys), bool)
        keep[order[last]] = True
        fails = FailureColumns.build(failures)
        if len(fails):
            fails = fails.take(~_in(fails.keys, all_keys[keep]))
        n_rows = int(keep.sum())
        dim, dtype = int(snap.meta["embed_dim"]), np.dtype(snap.meta["dtype"])
        width = max([cols.paths.dtype.itemsize] + [c.paths.dtype.itemsize for c, _ in extra])
        name = new_part_name("migrate-")
        inputs = [p.name for p in snap.parts] + [p.name for p in adopt]
        sink = PartSink(snap.parts_dir, name, n_rows=n_rows, dim=dim, dtype=dtype, path_width=width, meta=snap.meta,
                        base_generation=snap.generation, kind="migrate", failures=fails, inputs=inputs)
        try:
            step = max(256, memory_budget // row_bytes(dim, dtype, width))
            index_keep = np.flatnonzero(keep[: len(cols)])
            for a in range(0, len(index_keep), step):
                sel = index_keep[a : a + step]
                sink.append(cols.take(sel), snap.read(ids[sel]))
            offset = len(cols)
            for c, emb in extra:
                sel = np.flatnonzero(keep[offset : offset + len(c)])
                sink.append(c.take(sel), emb[sel])
                offset += len(c)
            written = sink.close()
        except BaseException as exc:
            sink.abort(exc)
            raise
        generation = snap.generation + 1
        retired = inputs + [p.name for p in stale]
        manifest = Manifest(dict(snap.meta), generation, float(snap.f.attrs.get("created", 0.0)),
                            [PartInfo.of(written, n_rows, failures=len(fails))],
                            [(n, generation) for n in retired])
    finally:
        snap.close()
    write_manifest(Path(path), manifest)


def _in(keys: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Mask of ``keys`` rows present in ``pool`` (both [n, 2] uint64)."""
    if not len(pool) or not len(keys):
        return np.zeros(len(keys), bool)
    joined = np.ascontiguousarray(pool).view("V16").ravel()
    return np.isin(np.ascontiguousarray(keys).view("V16").ravel(), joined)



