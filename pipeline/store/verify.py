"""Checking a whole cache like ``fsck`` (``featcache verify``), and repairing it (``extract --repair``).

Verify reads every byte once: each listed part's size and SHA-256 against the manifest,
its header (name, format, row counts) and tombstones, then reports damaged or missing
parts, unlisted files and paths listed twice. Repair, under the writer's lock, rebuilds a
damaged manifest from the self-describing parts (merge and migration outputs name the
parts they replaced, so those are left out), drops damaged parts from the manifest (their
rows are then missing, and the extract that follows embeds those images again), and
resolves any path listed twice.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CacheError, DamagedCacheError
from .manifest import Manifest, PartInfo, read_manifest, write_manifest
from .parts import DAMAGE, PartFile, entry_for, peek_part
from .schema import SCHEMA_VERSION, check_compatible, open_cache_file, parts_dir_for
from .seal import SealError, check_file

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    cache: str
    schema_version: int = SCHEMA_VERSION
    generation: int = 0
    parts: int = 0
    rows: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    damaged: list[dict[str, str]] = field(default_factory=list)  # {"part", "problem"}
    unlisted: list[str] = field(default_factory=list)  # part files no manifest names (adopted or deleted by the next writer)
    retired: list[str] = field(default_factory=list)  # files compaction retired, kept for readers
    manifest_damaged: str = ""

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.manifest_damaged

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "ok": self.ok, "schema_version": self.schema_version, "generation": self.generation, "parts": self.parts,
                "rows": self.rows, "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3), "damaged": self.damaged,
                "manifest_damaged": self.manifest_damaged, "unlisted": self.unlisted, "retired": self.retired}


def check_part(cache: Path, info: PartInfo) -> str:
    """'' when ``info``'s file is exactly what was written, else what is wrong with it."""
    folder = parts_dir_for(cache)
    path = folder / info.name
    if not path.is_file():
        return "missing"
    try:
        check_file(path, size=info.bytes or None, sha256=info.sha256, frame=info.frame, full=True)
        pf = PartFile(cache, folder, info.name, info)
        try:
            if pf.n_rows != info.rows or pf.n_failures != info.failures:
                return "row counts differ from the manifest's"
            pf.tombstones()
            if not info.sha256:  # no digest recorded: read every dataset through its checksums
                pf.read_all()
        finally:
            pf.close()
    except SealError as exc:
        return str(exc)
    except CacheError as exc:
        return str(exc).split("(", 1)[-1].split(")", 1)[0] if "(" in str(exc) else str(exc)
    return ""


def verify_cache(path: str | Path, progress: Callable[[int, int, float], None] | None = None) -> VerifyReport:
    """Check every part of the cache at ``path`` (read-only; no lock needed: a reader lease
    keeps a concurrent compaction from deleting what is being checked)."""
    from .leases import ReaderLease
    from .snapshot import open_snapshot

    t0 = time.perf_counter()
    path = Path(path)
    report = VerifyReport(str(path))
    try:
        f, version = open_cache_file(path)
        f.close()
    except DamagedCacheError as exc:
        report.manifest_damaged = str(exc)
        report.seconds = time.perf_counter() - t0
        return report
    if version < SCHEMA_VERSION:  # no checksums in schema 1: read every embedding through HDF5 at least
        snap = open_snapshot(path)
        try:
            report.schema_version, report.generation, report.parts = version, snap.generation, len(snap.parts)
            view = snap.live_columns()
            for start in range(0, len(view.ids), 1 << 16):
                snap.read(view.ids[start : start + (1 << 16)])
            report.rows = len(view.ids)
        finally:
            snap.close()
        report.seconds = time.perf_counter() - t0
        return report
    lease = ReaderLease(parts_dir_for(path))
    try:
        try:
            m = read_manifest(path)
        except DamagedCacheError as exc:
            report.manifest_damaged = str(exc)
            return report
        lease.pin(m.generation)
        report.generation, report.parts, report.rows = m.generation, len(m.parts), m.live_rows()
        for k, info in enumerate(m.parts):
            problem = check_part(path, info)
            report.bytes_checked += info.bytes
            if problem:
                report.damaged.append({"part": info.name, "problem": problem})
            if progress:
                progress(k + 1, len(m.parts), time.perf_counter() - t0)
        listed, retired = set(m.names()), {name for name, _ in m.garbage}
        folder = parts_dir_for(path)
        for entry in sorted(folder.glob("part-*.h5")) if folder.is_dir() else []:
            if entry.name in retired:
                report.retired.append(entry.name)
            elif entry.name not in listed:
                report.unlisted.append(entry.name)
    finally:
        lease.release()
        report.seconds = time.perf_counter() - t0
    return report


@dataclass
class RepairReport:
    rebuilt_manifest: bool = False
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"part", "rows" (None: unknown), "problem"}
    superseded: int = 0  # paths listed twice after a rebuild, older copies tombstoned


def rebuild_manifest(path: Path, meta: dict[str, Any], damaged: list[dict[str, Any]]) -> Manifest:
    """A manifest listing every intact schema-2 part in the parts folder, oldest first, except
    parts another present part replaced (merge/migration inputs); damaged part files are
    appended to ``damaged``. Its provenance comes from the parts' own (sealed) records, never
    from the damaged manifest, and must agree among them and with this run's ``meta``.

    Raises:
        IncompatibleError: the parts hold rows of another backbone than this run's (or of
            several: no rebuild can tell which is right).
    """
    folder = parts_dir_for(path)
    heads = []
    for entry in sorted(folder.glob("part-*.h5")) if folder.is_dir() else []:
        try:
            check_file(entry, full=True)
        except (SealError, OSError) as exc:
            damaged.append({"part": entry.name, "rows": None, "problem": str(exc)})
            continue
        head = peek_part(entry)
        if head is not None and head["schema_version"] == SCHEMA_VERSION and head["name"] == entry.name:
            heads.append(head)
    replaced = {n for h in heads for n in h["inputs"]}
    heads = sorted((h for h in heads if h["name"] not in replaced), key=lambda h: (h["base_generation"], h["created"], h["name"]))
    for h in heads:  # every part against the newest: one backbone, one preprocessing, one data root
        check_compatible(folder / h["name"], h["meta"], heads[-1]["meta"])
    newest_meta = dict(heads[-1]["meta"]) if heads else dict(meta)
    check_compatible(path, newest_meta, meta)
    parts = []
    for h in heads:
        try:
            pf = PartFile(path, folder, h["name"])
            try:
                parts.append(entry_for(folder / h["name"], pf.n_rows, pf.n_failures, len(pf.tombstones())))
            finally:
                pf.close()
        except (CacheError, SealError, *DAMAGE):
            continue  # damaged beyond its header: its rows are extracted again
    generation = max((h["base_generation"] for h in heads), default=0) + 1
    return Manifest(newest_meta, generation, min((h["created"] for h in heads), default=time.time()), parts, [])


def repair_cache(path: str | Path, meta: dict[str, Any]) -> RepairReport:
    """Make the cache at ``path`` consistent again, dropping what cannot be trusted (the caller
    holds the writer lock; a later extract re-embeds the dropped images)."""
    from .writer import CacheWriter

    path = Path(path)
    report = RepairReport()
    if not path.exists():
        return report
    try:
        f, version = open_cache_file(path)
        f.close()
        if version < SCHEMA_VERSION:
            return report  # schema 1 carries no checksums to repair by; the writer migrates it
        manifest = read_manifest(path)
    except DamagedCacheError:
        if not any(parts_dir_for(path).glob("part-*.h5")):
            raise  # nothing to rebuild from: never overwrite it
        manifest = None
    if manifest is None:
        manifest = rebuild_manifest(path, meta, report.dropped)
        report.rebuilt_manifest = True
        logger.info(f"rebuilt the manifest of {str(path)!r} from {len(manifest.parts)} part file(s)")
    keep = []
    for info in manifest.parts:
        problem = check_part(path, info)
        if problem:
            report.dropped.append({"part": info.name, "rows": info.live_rows, "problem": problem})
            logger.info(f"dropped damaged part {info.name} ({info.live_rows} rows: {problem}); its images will be extracted again")
        else:
            keep.append(info)
    if report.dropped or report.rebuilt_manifest:
        manifest.parts = keep
        manifest.garbage = manifest.garbage + [(d["part"], manifest.generation + 1) for d in report.dropped]
        manifest.generation += 1
        write_manifest(path, manifest)
        report.superseded = CacheWriter(path, {**manifest.meta, **{k: meta[k] for k in ("classes",) if k in meta}}).dedupe()
    return report
