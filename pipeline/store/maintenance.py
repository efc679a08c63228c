"""Keeping a cache in shape, on an open :class:`~.writer.CacheWriter` (which holds the lock):
crash recovery (stale temporaries, retired parts no reader needs, unlisted parts adopted or
deleted), size-tiered compaction, and repair's dedupe.

Each operation writes its new part(s) first and replaces the manifest last (the commit
point), then brings the writer's :class:`~.livestate.LiveState` along, as a commit does.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from .atomic import remove_stale_temporaries
from .columns import FailureColumns, RowColumns, Tombstones, remap_labels
from .compaction import plan_merges
from .leases import live_pins, needed_by_readers
from .livestate import add_deleted_counts
from .manifest import Manifest, PartInfo, write_manifest
from .parts import ADOPTABLE, PartFile, PartSink, entry_for, new_part_name, peek_part, row_bytes, write_part
from .schema import SCHEMA_VERSION, same_backbone_rows

if TYPE_CHECKING:
    from .writer import CacheWriter


# ---------------------------------------------------------------------- recovery

def recover(w: CacheWriter) -> None:
    """Temporaries of dead writers, retired parts no reader needs, and unlisted parts:
    adopted when written against this manifest by a commit or a rank, deleted otherwise."""
    remove_stale_temporaries(w.path.parent, w.path.name)
    remove_stale_temporaries(w.parts_dir)
    collect_garbage(w)
    if not w.parts_dir.is_dir():
        return
    listed = set(w.manifest.names()) | {name for name, _ in w.manifest.garbage}
    adopt = []
    for entry in sorted(w.parts_dir.glob("part-*.h5")):
        if entry.name in listed:
            continue
        head = peek_part(entry)
        if (head is not None and head["schema_version"] == SCHEMA_VERSION and head["kind"] in ADOPTABLE and head["name"] == entry.name
                and head["base_generation"] >= w.manifest.generation and same_backbone_rows(head["meta"], w.manifest.meta)):
            adopt.append((head["base_generation"], head["created"], entry.name))
        else:
            entry.unlink(missing_ok=True)
    if adopt:
        adopt_parts(w, [name for _, _, name in sorted(adopt)])


def collect_garbage(w: CacheWriter) -> None:
    """Delete retired parts that no live reader's snapshot still needs."""
    if not w.manifest.garbage:
        return
    pins = live_pins(w.parts_dir)
    keep = []
    for name, since in w.manifest.garbage:
        if needed_by_readers(since, pins):
            keep.append((name, since))
        else:
            (w.parts_dir / name).unlink(missing_ok=True)
    if len(keep) != len(w.manifest.garbage):
        w.manifest.garbage = keep
        w.garbage_dirty = True


def adopt_parts(w: CacheWriter, names: list[str]) -> None:
    """List complete parts whose writer died before listing them: their rows replace older
    rows of the same paths (tombstones in one new part), as a commit of them would have."""
    live = w.live
    live.ensure_index(w.manifest)
    try:
        new = w.manifest.copy()
        triples: list[tuple[str, int, int]] = []
        adopted_rows = 0
        for name in names:
            pf = PartFile(w.path, w.parts_dir, name)
            try:
                own, keys, fails, rows = pf.tombstones(), pf.column("keys"), pf.failures(), pf.n_rows
            finally:
                pf.close()
            live.forget_targets(w.manifest, own.keep_targets(set(live.parts)))  # its own tombstones (a commit's) already apply
            hits, row_hits, fail_hits = live.supersede(np.concatenate([keys, fails.keys]).reshape(-1, 2))
            triples += hits
            live.apply_deletions(Tombstones.from_triples(hits))
            live.add_rows(name, keys, fails, row_hits, fail_hits)
            new.parts.append(entry_for(w.parts_dir / name, rows, len(fails), len(own)))
            adopted_rows += rows
        tomb = Tombstones.from_triples(triples)
        if len(tomb):
            new.parts.append(_tombstone_part(w, new, tomb))
            live.add_part(new.parts[-1].name)
        live.recount(new)
        new.generation += 1
        write_manifest(w.path, new)
    except BaseException:
        live.forget()  # read again from the parts the manifest lists
        raise
    w.manifest, w.garbage_dirty = new, False
    w.adopted = adopted_rows


def _tombstone_part(w: CacheWriter, m: Manifest, tomb: Tombstones) -> PartInfo:
    """A part of only tombstones (no rows), listed in ``m`` by the caller."""
    name = new_part_name(w.tag)
    written = write_part(w.parts_dir, name, RowColumns.empty(), np.zeros((0, int(m.meta["embed_dim"])), m.meta["dtype"]),
                         meta=m.meta, base_generation=m.generation, kind="commit", tombstones=tomb)
    return PartInfo.of(written, tombstones=len(tomb))


# ---------------------------------------------------------------------- compaction

def compact(w: CacheWriter, full: bool = False) -> int:
    """Merge parts as the size-tiered policy says (``full``: everything into one part),
    streaming with a fixed memory budget. Returns how many merges ran."""
    w.live.load(w.manifest)
    if full:
        names = w.manifest.names()
        if len(names) > 1 or any(p.deleted or p.failures_deleted for p in w.manifest.parts):
            merge(w, names)
            return 1
        return 0
    merges = 0
    for _ in range(10_000):
        groups = plan_merges(w.manifest.parts, w.policy)
        if not groups:
            break
        for group in groups:
            merge(w, group)
            merges += 1
    return merges


def merge(w: CacheWriter, names: Sequence[str]) -> None:
    """Rewrite the live rows, failure records and still-useful tombstones of ``names`` into
    one new part (or none when nothing is live), then retire them. One input is open at a
    time (an open HDF5 file keeps caches of its own), so memory does not grow with the merge."""
    t0 = time.perf_counter()
    m = w.manifest
    group = [n for n in m.names() if n in set(names)]
    gset = set(group)
    infos = {p.name: p for p in m.parts}
    listed = set(m.names())
    dim, dtype = int(m.meta["embed_dim"]), np.dtype(m.meta["dtype"])
    masks = {n: w.live.parts[n].masks(infos[n]) for n in group}
    open_part = lambda n: PartFile(w.path, w.parts_dir, n, infos[n])  # noqa: E731
    triples, fails, width = [], [], 1
    for n in group:  # first pass: what the inputs carry besides rows
        with _closing(open_part(n)) as pf:
            width = max(width, pf.path_width)
            if infos[n].tombstones:
                triples += [t for t in pf.tombstones().triples() if t[0] in listed and t[0] not in gset]
            if infos[n].failures:
                fails.append(pf.failures().take(~masks[n][1]))
    carried, failures = Tombstones.from_triples(triples), FailureColumns.concat(fails)
    n_rows = sum(int((~masks[n][0]).sum()) for n in group)
    info = None
    if n_rows or len(failures) or len(carried):
        name = new_part_name(w.tag + "m")
        sink = PartSink(w.parts_dir, name, n_rows=n_rows, dim=dim, dtype=dtype, path_width=width, meta=m.meta,
                        base_generation=m.generation, kind="merge", failures=failures, tombstones=carried, inputs=group)
        try:
            step = max(256, w.policy.memory_budget // row_bytes(dim, dtype, width))
            for n in group:
                dead = masks.pop(n)[0]
                with _closing(open_part(n)) as pf:
                    for a in range(0, infos[n].rows, step):
                        keep = np.flatnonzero(~dead[a : a + step])
                        if not len(keep):
                            continue
                        cols, emb = pf.columns(slice(a, a + step)), pf.embeddings(slice(a, a + step))
                        if len(keep) < len(cols):  # (no copy when nothing in the slice is deleted)
                            cols, emb = cols.take(keep), emb[keep]
                        cols.labels = remap_labels(cols.labels, pf.classes, m.classes).astype(np.int32)
                        sink.append(cols, emb)
            written = sink.close()
        except BaseException as exc:
            sink.abort(exc)
            raise
        info = PartInfo.of(written, n_rows, failures=len(failures), tombstones=len(carried))
    new = m.copy()
    at = min(m.names().index(n) for n in group)
    new.parts = [p for p in new.parts if p.name not in gset]
    if info is not None:
        new.parts.insert(at, info)
    new.generation = m.generation + 1
    new.garbage = new.garbage + [(n, new.generation) for n in group]
    write_manifest(w.path, new)
    w.manifest, w.garbage_dirty = new, False
    w.live.replace_parts(group, info, failures)
    spent = time.perf_counter() - t0
    w.stats.merges += 1
    w.stats.merge_seconds += spent
    w.stats.merged_rows += n_rows
    w.stats.largest_merge_seconds = max(w.stats.largest_merge_seconds, spent)
    collect_garbage(w)


@contextmanager
def _closing(pf: PartFile) -> Iterator[PartFile]:
    try:
        yield pf
    finally:
        pf.close()


# ---------------------------------------------------------------------- repair

def dedupe(w: CacheWriter) -> int:
    """Tombstone every live row or failure record whose path also lives in a newer part (a
    manifest rebuilt from parts may list both). Returns how many were superseded."""
    keys, where = [], []  # where: (part position, kind, row) of each live entry
    for live in w.live.walk(w.manifest):
        if len(live.rows):
            keys.append(live.file.column("keys")[live.rows])
            where.append(np.stack([np.full(len(live.rows), live.position), np.zeros(len(live.rows), np.int64), live.rows], axis=1))
        if len(live.failures):
            keys.append(live.file.failures().keys[live.failures])
            where.append(np.stack([np.full(len(live.failures), live.position), np.ones(len(live.failures), np.int64), live.failures], axis=1))
    if not keys:
        return 0
    k, wh = np.concatenate(keys), np.concatenate(where)
    order = np.lexsort((wh[:, 0], k[:, 1], k[:, 0]))  # by key, then part age
    ks = k[order]
    superseded = np.zeros(len(order), bool)
    superseded[:-1] = (ks[1:] == ks[:-1]).all(axis=1)  # a newer entry of the same key follows
    dup = wh[order[superseded]]
    if not len(dup):
        return 0
    names = w.manifest.names()
    tomb = Tombstones.from_triples((names[int(i)], int(kind), int(r)) for i, kind, r in dup.tolist())
    new = w.manifest.copy()
    new.parts.append(_tombstone_part(w, new, tomb))
    add_deleted_counts(new, tomb)
    new.generation += 1
    write_manifest(w.path, new)
    w.manifest = new
    w.live.add_part(new.parts[-1].name)
    w.live.apply_deletions(tomb)
    w.live.index, w.live.failures = None, None  # rebuilt on the next commit
    return len(tomb)
