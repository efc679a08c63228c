"""Hugging Face datasets on disk as a source: ``hf:PATH``, read with pyarrow alone.

``PATH`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(Arrow stream files, ``dataset_info.json``, ``dataset_dict.json`` naming the splits) or a
Parquet file or folder as the Hub exports them (``train-00000-of-00001.parquet``…, the
features in the schema's ``huggingface`` metadata). The image column is the one whose
feature is ``Image`` (a struct of ``bytes`` and ``path``); the label column the first
``ClassLabel`` (its ``names`` are the classes). Rows are keyed ``<split>/<index>``, their
content hash is the SHA-256 of the image bytes, their fingerprint the size and mtime of the
file that holds them. Decoder processes open each file once (Arrow memory-mapped; Parquet
one row group at a time).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import DataError
from .folders import UNLABELED, ImageRecord, ScanResult

PREFIX = "hf:"
_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


def is_hf_spec(source: str | os.PathLike) -> bool:
    return str(source).startswith(PREFIX)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("hf: datasets are read with pyarrow: pip install -e '.[hf]'") from None
    import pyarrow as pa

    return pa


def _split_of(name: str) -> str:
    stem = name.split("-")[0].split(".")[0].lower()
    return _SPLITS.get(stem, "")


def _files(path: Path) -> list[tuple[str, Path]]:
    """(split name, data file) in order, for a save_to_disk folder or Parquet file/folder."""
    if path.is_file():
        return [(_split_of(path.name), path)]
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text()).get("splits", [])
        return [(_SPLITS.get(s, ""), f) for s in splits for f in sorted((path / s).glob("*.arrow"))]
    arrow = sorted(path.glob("*.arrow"))
    if arrow:
        return [("", f) for f in arrow]
    parquet = sorted(path.rglob("*.parquet"))
    return [(_split_of(f.name), f) for f in parquet]


def _features(file: Path) -> dict[str, Any]:
    """The datasets features of a data file (dataset_info.json beside Arrow, schema metadata in Parquet)."""
    pa = _pyarrow()
    if file.suffix == ".parquet":
        meta = pa.parquet.read_schema(file).metadata or {}
        info = json.loads(meta.get(b"huggingface", b"{}"))
        return info.get("info", {}).get("features", {})
    info_file = file.parent / "dataset_info.json"
    return json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {}


def _columns(file: Path, names: list[str], features: dict[str, Any]) -> tuple[str, str | None, list[str]]:
    image = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"), None)
    image = image or next((n for n in ("image", "img", "jpg", "png") if n in names), None)
    if image is None:
        raise DataError(f"{str(file)!r} has no image column (an Image feature, or a column named image/img); columns: {', '.join(names)}")
    label = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None)
    classes = list(features[label].get("names", [])) if label else []
    if label is None and "label" in names:
        label = "label"
    return image, label, classes


@lru_cache(maxsize=4)
def _arrow_table(file: str):
    pa = _pyarrow()
    return pa.ipc.open_stream(pa.memory_map(file)).read_all()


@lru_cache(maxsize=2)
def _parquet_group(file: str, group: int, column: str):
    pa = _pyarrow()
    return pa.parquet.ParquetFile(file).read_row_group(group, columns=[column]).column(0)


@lru_cache(maxsize=16)
def _group_starts(file: str) -> list[int]:
    pa = _pyarrow()
    meta = pa.parquet.ParquetFile(file).metadata
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    return starts


def read_item(container: str, index: int) -> bytes:
    """The image bytes of row ``index`` of ``container`` (``hf:FILE|COLUMN``)."""
    file, _, column = container[len(PREFIX):].partition("|")
    if file.endswith(".parquet"):
        starts = _group_starts(file)
        group = max(g for g, s in enumerate(starts) if s <= index)
        value = _parquet_group(file, group, column)[index - starts[group]].as_py()
    else:
        value = _arrow_table(file).column(column)[index].as_py()
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data and isinstance(value, dict) and value.get("path"):
        with open(Path(file).parent / value["path"], "rb") as fh:
            data = fh.read()
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError("the row has no image bytes")
    return bytes(data)


def scan_hf(spec: str) -> ScanResult:
    """Every row of a Hugging Face dataset on disk, as records read by row index.

    Raises:
        DataError: no such folder or file, no data file in it, no image column, or pyarrow missing.
    """
    pa = _pyarrow()
    path = Path(spec[len(PREFIX):]).expanduser()
    if not path.exists():
        raise DataError(f"{spec!r}: {str(path)!r} does not exist; pass a folder written by save_to_disk or a Parquet file or folder")
    path = path.resolve()
    files = _files(path)
    if not files:
        raise DataError(f"{spec!r}: no .arrow or .parquet data file in {str(path)!r}")
    records: list[ImageRecord] = []
    classes: list[str] = []
    counters: dict[str, int] = {}
    for split, file in files:
        try:
            if file.suffix == ".parquet":
                pf = pa.parquet.ParquetFile(file)
                names, n_rows = pf.schema_arrow.names, pf.metadata.num_rows
            else:
                table = _arrow_table(str(file))
                names, n_rows = table.column_names, table.num_rows
        except Exception as exc:  # noqa: BLE001 - pyarrow's own error types for damaged files
            raise DataError(f"{spec!r}: {str(file)!r} is not a readable Arrow/Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        image, label, names_of_classes = _columns(file, names, _features(file))
        classes = classes or names_of_classes
        if label is None:
            labels = [UNLABELED] * n_rows
        elif file.suffix == ".parquet":
            labels = pa.parquet.read_table(file, columns=[label]).column(0).to_pylist()
        else:
            labels = table.column(label).to_pylist()
        st = file.stat()
        key = split or "all"
        container = f"{PREFIX}{file}|{image}"
        for i, value in enumerate(labels):
            n = counters.get(key, 0)
            counters[key] = n + 1
            records.append(ImageRecord(f"{key}/{n:07d}", int(value) if value is not None and int(value) >= 0 else UNLABELED, split, st.st_size,
                                       st.st_mtime_ns, container, i))
    if not classes and any(r.label >= 0 for r in records):
        classes = [str(i) for i in range(max(r.label for r in records) + 1)]
    return ScanResult(path, "hf", classes, records, [], spec=f"{PREFIX}{path}")
