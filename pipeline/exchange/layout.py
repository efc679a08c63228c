"""The exchange format in one place: file names, columns, metadata keys, and which layout a
source is.

Two layouts (both described in the README's "Export and import"):

* ``parquet``: ``DIR/embeddings.parquet``, one row per cached row, columns ``path``, ``label``,
  ``class``, ``split`` and ``embedding`` (a fixed-size list of float32/float16);
* ``npy``: ``DIR/embeddings.npy`` ``[N, D]`` + ``DIR/metadata.parquet`` (the same columns but
  ``embedding``, in the same order) + ``DIR/provenance.json`` — the layout clip-retrieval
  writes (its ``img_emb/*.npy`` and ``metadata/*.parquet``, flattened into one folder).

Both carry the cache's provenance as Parquet key-value metadata (``featcache.provenance``,
``featcache.schema``, ``featcache.export``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError

EXPORT_FORMATS: tuple[str, ...] = ("parquet", "npy")
EXPORT_SCHEMA = "featcache.export/1"

PARQUET_FILE = "embeddings.parquet"
NPY_FILE = "embeddings.npy"
METADATA_FILE = "metadata.parquet"
PROVENANCE_FILE = "provenance.json"

PATH, LABEL, CLASS, SPLIT, EMBEDDING = "path", "label", "class", "split", "embedding"
PATH_FALLBACKS = ("image_path", "url")  # clip-retrieval's metadata names the file image_path (or url)

KEY_SCHEMA = b"featcache.schema"
KEY_PROVENANCE = b"featcache.provenance"
KEY_EXPORT = b"featcache.export"

SPLIT_NAMES = ("train", "val", "test")  # and "" (no split); --split none selects those rows
EXTRA_HINT = "pip install -e '.[parquet]'"


def require_pyarrow(what: str) -> Any:
    """``pyarrow.parquet``, or one line saying which extra installs it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{what} needs pyarrow: {EXTRA_HINT}") from None
    return pq


def file_metadata(provenance: dict[str, Any], export: dict[str, Any]) -> dict[bytes, bytes]:
    return {KEY_SCHEMA: EXPORT_SCHEMA.encode(), KEY_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode(),
            KEY_EXPORT: json.dumps(export, sort_keys=True, default=str).encode()}


def read_json_key(metadata: dict[bytes, bytes] | None, key: bytes, where: Path) -> dict[str, Any] | None:
    """A JSON object stored under ``key`` in a Parquet file's key-value metadata (None if absent)."""
    raw = (metadata or {}).get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(where)!r}: its {key.decode()} metadata is not JSON ({exc}); pass the provenance on the command line "
                        "(--model, --weights, --classes) and remove that key, or export again") from None
    if not isinstance(value, dict):
        raise DataError(f"{str(where)!r}: its {key.decode()} metadata is not a JSON object")
    return value


def detect_source(src: Path) -> tuple[str, Path]:
    """``(format, main file)`` of an export to import: a folder holding ``embeddings.npy`` (npy
    layout) or ``embeddings.parquet``, or a ``.parquet``/``.npy`` file itself.

    Raises:
        UsageError: missing, or neither layout.
    """
    src = Path(src)
    if not src.exists():
        raise UsageError(f"import source {str(src)!r} does not exist; pass a folder written by `export` or a .parquet file")
    if src.is_dir():
        if (src / NPY_FILE).is_file():
            return "npy", src / NPY_FILE
        if (src / PARQUET_FILE).is_file():
            return "parquet", src / PARQUET_FILE
        if (src / METADATA_FILE).is_file():
            raise DataError(f"{str(src)!r} holds {METADATA_FILE} but no {NPY_FILE}: the export is incomplete; export it again")
        raise UsageError(f"{str(src)!r} holds neither {PARQUET_FILE} nor {NPY_FILE} (+ {METADATA_FILE}); pass a folder written by `export` "
                         "or a .parquet file with path and embedding columns")
    if src.suffix.lower() == ".npy":
        return "npy", src
    if src.suffix.lower() == ".parquet":
        return "parquet", src
    raise UsageError(f"import source {str(src)!r} is neither a folder nor a .parquet or .npy file")
