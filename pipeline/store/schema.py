"""The cache's on-disk schema in one place: format names, the schema version, the
provenance keys rows must share, and opening an index with checks that name the fix."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import h5py

from ..errors import CacheError, IncompatibleError, UsageError, command_hint

FORMAT = "featcache.cache"
PART_FORMAT = "featcache.part"
SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
# Provenance keys that must be equal for rows to share one cache.
COMPAT_KEYS = ("model", "weights", "preprocessing", "embed_dim", "dtype", "precision", "decode", "data_root", "layout")
# What a cache written before a key existed holds.
COMPAT_DEFAULTS = {"precision": "fp32", "decode": "exact"}


def parts_dir_for(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def open_index(path: Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"cache {str(path)!r} does not exist; create it with `{command_hint(f'extract DATA_DIR --model NAME --out {path}')}`")
    if path.is_dir():
        raise UsageError(f"cache {str(path)!r} is a folder; pass the .h5 index file written by extract")
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


def read_strings(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[...]) if ds.shape[0] else []


def check_parts_present(path: Path, names: Sequence[str]) -> None:
    folder = parts_dir_for(path)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CacheError(f"cache {str(path)!r} is missing {len(missing)} part file(s) in {str(folder)!r} (e.g. {missing[0]}); the cache was moved without its .parts folder — move both, or re-extract")


def weights_identity(meta: dict[str, Any]) -> str:
    """What a backbone's weights are: a weights name or file digest, or for a seeded random
    init (``none``) the seed, since two seeds are two different backbones."""
    weights, seed = meta.get("weights"), meta.get("seed")  # the seed is recorded only for a random init
    return f"{weights} (seed {int(seed)})" if seed is not None else str(weights)


def compat_value(meta: dict[str, Any], key: str) -> Any:
    """``meta[key]`` as compatibility checks compare it (weights by identity, old caches' defaults)."""
    return weights_identity(meta) if key == "weights" else meta.get(key, COMPAT_DEFAULTS.get(key))


def same_backbone_rows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(compat_value(a, k) == compat_value(b, k) for k in COMPAT_KEYS)


def check_compatible(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse to mix rows of different backbones, weights (seeds), preprocessing, dtype or data roots."""
    for key in COMPAT_KEYS:
        held, wanted = compat_value(have, key), compat_value(want, key)
        if held != wanted:
            raise IncompatibleError(
                f"cache {str(path)!r} holds {key}={held!r} but this run has {key}={wanted!r}; "
                "use another --out (the default path is derived from model and weights) or delete the cache"
            )
