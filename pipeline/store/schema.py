"""The cache's on-disk schema in one place: format names, the schema version, the
provenance keys rows must share, and opening an index with checks that name the fix."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import h5py

from ..errors import CacheError, IncompatibleError

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


def open_index(path: Path) -> h5py.File:
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


def read_strings(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[...]) if ds.shape[0] else []


def check_parts_present(path: Path, names: Sequence[str]) -> None:
    folder = parts_dir_for(path)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CacheError(f"cache {str(path)!r} is missing {len(missing)} part file(s) in {str(folder)!r} (e.g. {missing[0]}); the cache was moved without its .parts folder — move both, or re-extract")


def check_compatible(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse to mix rows of different backbones, weights, preprocessing, dtype or data roots."""
    for key in COMPAT_KEYS:
        held, wanted = have.get(key, COMPAT_DEFAULTS.get(key)), want.get(key, COMPAT_DEFAULTS.get(key))
        if held != wanted:
            raise IncompatibleError(
                f"cache {str(path)!r} holds {key}={held!r} but this run has {key}={wanted!r}; "
                "use another --out (the default path is derived from model and weights) or delete the cache"
            )
