"""The manifest ``X.h5``: which parts make up the cache now. Its size depends on the number
of parts, never on the number of rows, so a commit costs the same at 10 k rows and at 10 M.

The manifest is sealed as a whole (``seal.py``) and parsed from the bytes that were checked,
so one flipped bit anywhere in it (a class name, the seed, a part's digest) is a damaged
manifest, never a different provenance.

Layout (schema 2)::

    attrs: format, schema_version, generation, created, updated, meta_json (full provenance),
           and for plain-h5py readers: model, weights, embed_dim, dtype, data_root, layout, versions
    classes [C] utf-8
    parts/{name, rows, deleted, failures, failures_deleted, tombstones, bytes, sha256, frame}   one row per part
        (sha256: every byte after the part's seal; frame: what HDF5 parses, checked on every open)
    garbage/{name, since}   retired files, deleted once no reader of an older generation needs them
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .h5files import WrittenFile, new_hdf5, put
from .schema import FORMAT, SCHEMA_VERSION, manifest_damaged, open_cache_file

PLAIN_ATTRS = ("model", "weights", "embed_dim", "dtype", "data_root", "layout", "featcache_version", "torch_version", "torchvision_version")
_INT_FIELDS = ("rows", "deleted", "failures", "failures_deleted", "tombstones", "bytes")


@dataclass
class PartInfo:
    """One part as the manifest lists it."""

    name: str
    rows: int
    deleted: int = 0
    failures: int = 0
    failures_deleted: int = 0
    tombstones: int = 0
    bytes: int = 0
    sha256: str = ""  # sealed parts: of every byte after the seal; older parts: of the whole file
    frame: str = ""  # sealed parts: of what HDF5 parses (empty for parts written before seals)

    @classmethod
    def of(cls, written: WrittenFile, rows: int = 0, failures: int = 0, tombstones: int = 0) -> PartInfo:
        """The entry of a part just written."""
        return cls(written.path.name, rows, failures=failures, tombstones=tombstones, bytes=written.bytes, sha256=written.sha256, frame=written.frame)

    @property
    def live_rows(self) -> int:
        return self.rows - self.deleted

    @property
    def live_failures(self) -> int:
        return self.failures - self.failures_deleted

    @property
    def weight(self) -> int:
        """What compaction sizes a part by: the records it still carries."""
        return self.live_rows + self.live_failures + self.tombstones


@dataclass
class Manifest:
    meta: dict[str, Any]
    generation: int = 0
    created: float = field(default_factory=time.time)
    parts: list[PartInfo] = field(default_factory=list)
    garbage: list[tuple[str, int]] = field(default_factory=list)  # (file name, generation since which unused)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def live_rows(self) -> int:
        return sum(p.live_rows for p in self.parts)

    def copy(self) -> Manifest:
        return Manifest(dict(self.meta), self.generation, self.created, [replace(p) for p in self.parts], list(self.garbage))


def read_manifest(path: Path) -> Manifest:
    """The schema-2 manifest at ``path`` (the caller checked the version)."""
    f, _ = open_cache_file(path)
    try:
        with f:
            meta = json.loads(f.attrs["meta_json"])
            g = f["parts"]
            names = [n.decode() for n in g["name"][...].tolist()]
            cols = {k: g[k][...].astype(np.int64).tolist() for k in _INT_FIELDS}
            digests = [d.decode() for d in g["sha256"][...].tolist()]
            frames = [d.decode() for d in g["frame"][...].tolist()] if "frame" in g else [""] * len(names)
            parts = [PartInfo(n, **{k: int(cols[k][i]) for k in _INT_FIELDS}, sha256=digests[i], frame=frames[i]) for i, n in enumerate(names)]
            gg = f["garbage"]
            garbage = list(zip([n.decode() for n in gg["name"][...].tolist()], [int(s) for s in gg["since"][...].tolist()]))
            m = Manifest(meta, int(f.attrs["generation"]), float(f.attrs.get("created", 0.0)), parts, garbage)
            m.meta["classes"] = [c.decode("utf-8", "surrogateescape") for c in f["classes"][...].tolist()]
            return m
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise manifest_damaged(path, exc) from None


def write_manifest(path: Path, m: Manifest) -> None:
    """Replace ``path`` with ``m`` atomically: the moment a commit becomes visible."""
    n = len(m.parts)
    reserve = 96 * 1024 + 512 * (n + len(m.garbage)) + len(json.dumps(m.meta)) * 2
    with new_hdf5(path, reserve, chunks_outside_frame=False) as (f, _):
        f.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "generation": int(m.generation), "created": m.created,
                        "updated": time.time(), "meta_json": json.dumps(m.meta, sort_keys=True)})
        f.attrs["preprocessing_json"] = json.dumps(m.meta.get("preprocessing"), sort_keys=True)
        for key in PLAIN_ATTRS:
            value = m.meta.get(key)
            if value is not None:
                f.attrs[key] = value if isinstance(value, (int, float)) else str(value)
        put(f, "classes", _bytes([c.encode("utf-8", "surrogateescape") for c in m.classes]))
        g = f.create_group("parts")
        put(g, "name", _bytes([p.name.encode() for p in m.parts]))
        for key in _INT_FIELDS:
            put(g, key, np.array([getattr(p, key) for p in m.parts], dtype=np.int64))
        put(g, "sha256", _bytes([p.sha256.encode() for p in m.parts]))
        put(g, "frame", _bytes([p.frame.encode() for p in m.parts]))
        g = f.create_group("garbage")
        put(g, "name", _bytes([name.encode() for name, _ in m.garbage]))
        put(g, "since", np.array([since for _, since in m.garbage], dtype=np.int64))


def _bytes(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype="S") if items else np.zeros(0, "S1")
