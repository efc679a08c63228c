"""The cache's on-disk schema in one place: format names, the schema version, the
provenance keys rows must share, and opening a cache's top file with checks that name the fix.

Schema 2 (this version): ``X.h5`` is a small *manifest* (the list of parts, their row and
deletion counts, sizes and SHA-256 digests, the provenance) and ``X.h5.parts/`` holds
self-describing part files (see ``parts.py``). Schema 1 (an index holding every row's
metadata) is still read, and migrated to schema 2 by the first write.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import h5py

from ..errors import CacheError, DamagedCacheError, IncompatibleError, UsageError, command_hint
from ..provenance import CACHE_IDENTITY, recorded
from .seal import HDF5_SIGNATURE, SEAL_BYTES, SealError, check_sealed_bytes, is_sealed

FORMAT = "featcache.cache"
PART_FORMAT = "featcache.part"
SCHEMA_VERSION = 2
STR = h5py.string_dtype("utf-8")


def parts_dir_for(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".parts")


MAX_SEALED_MANIFEST = 1 << 30  # a manifest lists parts, never rows: anything larger is not one


def open_cache_file(path: Path) -> tuple[h5py.File, int]:
    """Open a cache's top file (schema-2 manifest or schema-1 index) read-only: ``(file, schema version)``.

    A sealed manifest is read whole, checked, and parsed from those very bytes (a writer
    replacing it meanwhile cannot slip another file in between); a top file written before
    seals is opened as before.

    Raises:
        UsageError: missing path, or a folder. CacheError: not HDF5, not ours, newer schema.
        DamagedCacheError: the seal or the file's checksums fail.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"cache {str(path)!r} does not exist; create it with `{command_hint(f'extract DATA_DIR --model NAME --out {path}')}`")
    if path.is_dir():
        raise UsageError(f"cache {str(path)!r} is a folder; pass the .h5 file written by extract")
    try:
        source = _checked_manifest_bytes(path)
        f = h5py.File(io.BytesIO(source) if source is not None else path, "r")
    except (SealError, OSError) as exc:
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        if parts_dir_for(path).is_dir():  # the parts are there: this was our manifest
            raise manifest_damaged(path, detail) from None
        raise CacheError(f"{str(path)!r} is not a readable HDF5 file (truncated or corrupt: {detail}); "
                         "use a new --out, or delete it") from None
    try:
        fmt = f.attrs.get("format")
        version = int(f.attrs.get("schema_version", 0))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        f.close()
        raise manifest_damaged(path, exc) from None
    if fmt != FORMAT:
        f.close()
        raise CacheError(f"{str(path)!r} is an HDF5 file but not a featcache cache (format={fmt!r}); pass a file written by `extract`")
    if version > SCHEMA_VERSION:
        f.close()
        raise CacheError(f"{str(path)!r} uses cache schema {version}, newer than this featcache understands ({SCHEMA_VERSION}); upgrade featcache")
    return f, version


def _checked_manifest_bytes(path: Path) -> bytes | None:
    """A sealed top file's bytes, checked; None for a plain HDF5 file (written before seals).

    Raises:
        SealError: a damaged seal or content, or a file that is neither sealed nor HDF5.
        OSError: unreadable.
    """
    with open(path, "rb") as fh:
        head = fh.read(SEAL_BYTES)
        if head.startswith(HDF5_SIGNATURE):
            return None
        size = os.fstat(fh.fileno()).st_size
        if not is_sealed(head) and not parts_dir_for(path).is_dir():
            raise SealError("neither a featcache manifest nor HDF5")
        if size > MAX_SEALED_MANIFEST:
            raise SealError(f"{size:,} bytes: too large for a manifest")
        data = head + fh.read()
    check_sealed_bytes(data)
    return data


def manifest_damaged(path: Path, exc: BaseException | str) -> DamagedCacheError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return DamagedCacheError(f"cache {str(path)!r}: its manifest is damaged ({detail}); re-run your extract command with --repair "
                             "to rebuild it from the part files")


def weights_identity(meta: dict[str, Any]) -> str:
    """What a backbone's weights are: a weights name or file digest, or for a seeded random
    init (``none``) the seed, since two seeds are two different backbones."""
    weights, seed = meta.get("weights"), meta.get("seed")  # the seed is recorded only for a random init
    return f"{weights} (seed {int(seed)})" if seed is not None else str(weights)


def compat_value(meta: dict[str, Any], key: str) -> Any:
    """``meta[key]`` as compatibility checks compare it (weights by identity, old caches' defaults)."""
    return weights_identity(meta) if key == "weights" else recorded(meta, key)


def same_backbone_rows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(compat_value(a, k) == compat_value(b, k) for k in CACHE_IDENTITY)


def check_compatible(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse to mix rows of different backbones, weights (seeds), preprocessing, dtype or data roots."""
    for key in CACHE_IDENTITY:
        held, wanted = compat_value(have, key), compat_value(want, key)
        if held != wanted:
            raise IncompatibleError(
                f"cache {str(path)!r} holds {key}={held!r} but this run has {key}={wanted!r}; "
                "use another --out (the default path is derived from model and weights) or delete the cache"
            )
