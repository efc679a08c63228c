"""Manifests in, records out: a CSV, TSV, JSON-lines or Parquet file listing images.

A manifest has a ``path`` column (relative to the manifest's folder, or absolute) and
optional ``label`` (class name) and ``split`` (train/val/test) columns; the names are
configurable. Rows are keyed by path exactly as a folder scan keys them (``cat/0.jpg``
relative to the manifest's folder; a file outside it by its absolute path), one key per file
however it is spelled (``./a/../cat//0.jpg`` is ``cat/0.jpg``), and classes are the sorted
label names as ImageFolder sorts class folders — so the same images give the same cache rows
from a folder or from a manifest beside it. A row that cannot be used (a missing file, an
empty label, an unknown split, a path ``pipeline.names`` refuses, a repeated path: the first
listing is kept) is skipped with its row number and reason; the rest is processed.
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..names import LISTED_AGAIN, URL, printable, row_path_problem, shown
from .folders import UNLABELED, ImageRecord, ScanResult

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test", "testing": "test", "": ""}


@dataclass(frozen=True)
class ManifestColumns:
    """Which manifest columns hold the path, the class name and the split."""

    path: str = "path"
    label: str = "label"
    split: str = "split"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def is_manifest(source: str | os.PathLike) -> bool:
    p = Path(source).expanduser()
    return p.suffix.lower() in MANIFEST_SUFFIXES and not p.is_dir()


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"manifest {str(path)!r} line {n} is not JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"manifest {str(path)!r} line {n} is not a JSON object")
            columns.update(dict.fromkeys(row))
            rows.append(row)
    return list(columns), rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"manifest {str(path)!r} is Parquet: reading it needs pyarrow (pip install -e '.[parquet]')") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for bad files
        raise DataError(f"manifest {str(path)!r} is not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return table.column_names, table.to_pylist()


def read_manifest(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows as dicts) of a manifest, by its suffix."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError:
        raise DataError(f"manifest {str(path)!r} is not UTF-8 text; save it as UTF-8 (or Parquet)") from None
    except csv.Error as exc:
        raise DataError(f"manifest {str(path)!r} is not valid {suffix[1:].upper()} ({exc})") from None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def manifest_row_path(given: str, folder: str) -> str:
    """The row path a manifest entry is stored under, one per file however it is spelled:
    ``given`` (relative to the manifest's ``folder``, or absolute) made absolute and
    normalised (``.``, ``..``, repeated slashes; lexically, as the file system would resolve
    it without symlinks), then relative to ``folder`` when inside it — the key a folder
    scan gives the same file — else the absolute path (no ``..`` escaping the folder). A URL
    is left as it is, for ``row_path_problem`` to refuse."""
    if URL.match(given):
        return given
    full = posixpath.normpath(posixpath.join(folder, given.replace(os.sep, "/")))
    full = "/" + full.lstrip("/")  # normpath keeps a leading '//'
    base = folder.rstrip("/") + "/"
    return full[len(base):] if full.startswith(base) else full


def scan_manifest(source: str | os.PathLike, columns: ManifestColumns | None = None) -> ScanResult:
    """The images a manifest lists, with labels, splits and fingerprints.

    Raises:
        DataError: the manifest is missing, unreadable, lacks the path column, or lists no usable image.
    """
    columns = columns or ManifestColumns()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} does not exist; pass an image folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    path = path.resolve()
    names, rows = read_manifest(path)
    if columns.path not in names:
        raise DataError(f"manifest {str(path)!r} has no column {columns.path!r} (columns: {', '.join(names) or 'none'}); name it with --path-col")
    has_label, has_split = columns.label in names, columns.split in names
    root = path.parent
    labels = sorted({_text(r.get(columns.label)) for r in rows} - {""}) if has_label else []
    label_of = {c: i for i, c in enumerate(labels)}
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, 2 if path.suffix.lower() in (".csv", ".tsv") else 1):  # row numbers as an editor shows them
        given = _text(row.get(columns.path))
        where = f"{path.name} row {n}"
        if not given:
            skipped.append((f"<{where}>", f"empty {columns.path!r}"))
            continue
        rel = manifest_row_path(given, str(root))
        problem = row_path_problem(rel, absolute_ok=True)
        if problem:
            skipped.append((shown(given), f"{where}: {columns.path!r} {problem}"))
            continue
        if rel in seen:
            skipped.append((rel, f"{where}: {LISTED_AGAIN}"))
            continue
        seen.add(rel)
        label = UNLABELED
        if has_label:
            name = _text(row.get(columns.label))
            if not name:
                skipped.append((rel, f"{where}: empty {columns.label!r}"))
                continue
            label = label_of[name]
        split = ""
        if has_split:
            raw = _text(row.get(columns.split)).lower()
            if raw not in SPLIT_ALIASES:
                skipped.append((rel, f"{where}: split {raw!r} is not train, val or test"))
                continue
            split = SPLIT_ALIASES[raw]
        try:
            st = os.stat(root / rel)
        except OSError as exc:
            skipped.append((rel, f"{where}: {exc.strerror.lower() if exc.strerror else 'cannot stat'}"))
            continue
        records.append(ImageRecord(rel, label, split, st.st_size, st.st_mtime_ns))
    if not records:
        raise DataError(f"manifest {str(path)!r} lists no usable image ({len(rows)} rows, {len(skipped)} skipped"
                        + (f", e.g. {shown(skipped[0][0])}: {printable(skipped[0][1])}" if skipped else "") + ")")
    return ScanResult(root, "manifest", labels, records, skipped, source=path, columns=columns.to_dict())
