"""Exports (ours, or Parquet/npy written by other tools) into a cache, through the public
``CacheWriter``: rows keyed by path (importing the same data again replaces rows, never
duplicates them), committed chunk by chunk in bounded memory.

The provenance comes from the file (``featcache.provenance``) when it has one; ``model``,
``weights``, ``classes``, ``data_root``, ``preprocessing`` and ``layout`` given here replace
its values, and a file without provenance needs at least ``model``. What was imported, from
where and what was overridden is recorded under ``meta["imported"]``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import DTYPES
from ..errors import DataError, UsageError
from ..names import LISTED_AGAIN, printable, row_path_problem, shown
from ..provenance import timestamp, versions
from ..store import CacheWriter, new_cache_meta
from .layout import (
    CLASS,
    EMBEDDING,
    KEY_PROVENANCE,
    LABEL,
    METADATA_FILE,
    PATH,
    PATH_FALLBACKS,
    PROVENANCE_FILE,
    SPLIT,
    detect_source,
    read_json_key,
    require_pyarrow,
)

logger = logging.getLogger(__name__)

COMMIT_BYTES = 32 << 20  # embeddings per commit (one part each): the import's memory
SPLIT_VALUES = ("", "train", "val", "test")  # the store's split codes 0..3

ProgressFn = Callable[[int, int, float], None]


@dataclass
class ImportSummary:
    """What ``import_cache`` wrote."""

    cache: str
    source: str
    format: str
    rows: int  # rows imported: the source's rows, each path once (the rows of this source the cache holds)
    cache_rows: int  # rows the cache holds afterwards
    embed_dim: int
    dtype: str
    classes: list[str]
    provenance_from: str  # "file", "command line" or "file + command line"
    overrides: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    source_rows: int = 0  # rows read from the source: rows + len(skipped)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): a path listed again (the first listing is kept)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]  # as extract reports a manifest's skipped rows
        return d


class _Source:
    """One export opened for reading: its columns, row count, embedding shape and provenance."""

    def __init__(self, fmt: str, main: Path, pq):
        self.fmt, self.main = fmt, main
        self.npy: Path | None = None
        if fmt == "npy":
            self.npy = main
            table_file = main.with_name(METADATA_FILE)
            if not table_file.is_file():
                raise DataError(f"{str(main)!r} has no {METADATA_FILE} beside it (path, label, class, split in the same order): "
                                "the export is incomplete; export it again")
        else:
            table_file = main
        self.table_file = table_file
        try:
            self.pf = pq.ParquetFile(str(table_file))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for bad files
            raise DataError(f"{str(table_file)!r} is not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        self.schema = self.pf.schema_arrow
        self.names = list(self.schema.names)
        self.rows = self.pf.metadata.num_rows
        self.path_col = next((c for c in (PATH, *PATH_FALLBACKS) if c in self.names), None)
        if self.path_col is None:
            raise DataError(f"{str(table_file)!r} has no {PATH!r} column (columns: {', '.join(self.names)}); every row needs the file's relative path")
        self._check_column_types()
        self.provenance = read_json_key(self.schema.metadata, KEY_PROVENANCE, table_file)
        if fmt == "npy":
            self._open_npy()
            if self.provenance is None and main.with_name(PROVENANCE_FILE).is_file():
                self.provenance = _provenance_json(main.with_name(PROVENANCE_FILE))
        else:
            self._check_embedding_column()

    def where(self, row: int, file: Path | None = None) -> str:
        """``'FILE' row N`` for a message: rows numbered from 1 in file order, as a Parquet manifest's."""
        return f"{str(file or self.table_file)!r} row {row + 1:,}"

    def _check_column_types(self) -> None:
        """Every column the import reads has a type it can use, before any row is read: one
        line naming the file, the column, its type and the type expected (not an Arrow error)."""
        for name, column in ((self.path_col, PATH), (LABEL, LABEL), (CLASS, CLASS), (SPLIT, SPLIT)):
            typ = self.schema.field(name).type if name in self.names else None
            if typ is not None and not _type_fits(column, typ):
                raise DataError(f"{str(self.table_file)!r}: column {name!r} is {typ}; it must be {EXPECTED_TYPES[column]} (cast it and write the file again)")

    def _open_npy(self) -> None:
        try:
            mm = np.load(self.npy, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{str(self.npy)!r} is not a readable .npy file ({exc})") from None
        if mm.ndim != 2:
            raise DataError(f"{str(self.npy)!r} has shape {mm.shape}; embeddings.npy must be 2-D [rows, dim]")
        if mm.dtype.kind != "f":
            raise DataError(f"{str(self.npy)!r} holds {mm.dtype}; embeddings must be floats (float16 or float32)")
        self.dim, self.file_dtype = int(mm.shape[1]), np.dtype(mm.dtype)
        self.npy_offset, self.fortran = int(mm.offset), bool(mm.flags.f_contiguous and not mm.flags.c_contiguous)
        if mm.shape[0] != self.rows:
            raise DataError(f"{str(self.npy)!r} has {mm.shape[0]:,} rows but {str(self.table_file)!r} {self.rows:,}: they are not one export; "
                            "export it again")
        del mm

    def _check_embedding_column(self) -> None:
        import pyarrow as pa

        if EMBEDDING not in self.names:
            raise DataError(f"{str(self.main)!r} has no {EMBEDDING!r} column (columns: {', '.join(self.names)}); it needs a list of floats per row")
        typ = self.schema.field(EMBEDDING).type
        if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_floating(typ.value_type):
            raise DataError(f"{str(self.main)!r}: column {EMBEDDING!r} is {typ}; it must be a list of floats, the same length in every row "
                            "(fixed_size_list<float32|float16>[D]; cast it and write the file again)")
        self.file_dtype = np.dtype(typ.value_type.to_pandas_dtype())
        if pa.types.is_fixed_size_list(typ):
            self.dim = int(typ.list_size)
        else:  # a variable-size list (pandas writes these): every row must have the first row's length
            first = next(self.pf.iter_batches(batch_size=1, columns=[EMBEDDING]), None)
            self.dim = len(first.column(0)[0]) if first is not None and first.num_rows and first.column(0)[0].is_valid else 0

    def chunks(self, rows: int) -> Iterator[tuple[Any, np.ndarray]]:
        """``(record batch of the other columns, embeddings [n, D])`` in file order."""
        cols = [c for c in (self.path_col, LABEL, CLASS, SPLIT) if c in self.names]
        if self.fmt == "parquet":
            for batch in self.pf.iter_batches(batch_size=rows, columns=[*cols, EMBEDDING]):
                yield batch, self._embeddings(batch.column(EMBEDDING))
            return
        with open(self.npy, "rb") as fh:
            done = 0
            for batch in self.pf.iter_batches(batch_size=rows, columns=cols):
                n = batch.num_rows
                if self.fortran:
                    emb = np.ascontiguousarray(np.load(self.npy, mmap_mode="r")[done : done + n])
                else:
                    emb = np.fromfile(fh, dtype=self.file_dtype, count=n * self.dim, offset=self.npy_offset if done == 0 else 0).reshape(n, self.dim)
                if len(emb) != n:
                    raise DataError(f"{str(self.npy)!r} ended after {done + len(emb):,} rows ({self.rows:,} expected): the file is truncated")
                done += n
                yield batch, emb

    def _embeddings(self, arr) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if arr.null_count:
            raise DataError(f"{str(self.main)!r}: {arr.null_count} row(s) have no {EMBEDDING!r}; every row needs its embedding")
        if not pa.types.is_fixed_size_list(arr.type):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != self.dim).any():
                raise DataError(f"{str(self.main)!r}: embeddings have different lengths ({int(lengths.min())} to {int(lengths.max())}); "
                                "every row needs the same dimension")
        values = arr.flatten()
        if values.null_count:
            raise DataError(f"{str(self.main)!r}: some embedding values are null; every value must be a number")
        return values.to_numpy(zero_copy_only=False).reshape(len(arr), self.dim)


EXPECTED_TYPES = {PATH: "a string (the file's path relative to the data root)", LABEL: "an integer (the class index; -1 or null = unlabeled)",
                  CLASS: "a string (the class name; null = unlabeled)", SPLIT: "a string (train, val, test or empty)"}


def _is_text(typ) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_string_view", lambda t: False)
    return (pa.types.is_string(typ) or pa.types.is_large_string(typ) or view(typ)
            or (pa.types.is_dictionary(typ) and _is_text(typ.value_type)))


def _type_fits(column: str, typ) -> bool:
    """Whether an Arrow type can hold ``column``: text for path, class and split; numbers for
    label (floats only when whole: pandas writes an integer column with gaps as float64);
    an all-null column for the optional ones."""
    import pyarrow as pa

    if column == PATH:
        return _is_text(typ)
    if pa.types.is_null(typ):
        return True
    if column == LABEL:
        return pa.types.is_integer(typ) or pa.types.is_floating(typ)
    return _is_text(typ)


def _provenance_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} is not readable JSON ({exc}); fix or delete it and pass the provenance on the command line") from None
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    return prov if isinstance(prov, dict) else None


def _split_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = [c.strip() for c in (value.split(",") if isinstance(value, str) else value)]
    return [c for c in items if c]


def _class_names(src: _Source) -> list[str]:
    """Sorted distinct names of the class column (one pass over that column alone)."""
    import pyarrow.compute as pc

    seen: set[str] = set()
    for batch in src.pf.iter_batches(batch_size=1 << 16, columns=[CLASS]):
        seen.update(v for v in pc.unique(batch.column(0)).to_pylist() if v)
    return sorted(seen)


def _build_meta(src: _Source, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    prov = dict(src.provenance or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    model = given.get("model", prov.get("model"))
    if not model:
        raise UsageError(f"{str(src.table_file)!r} carries no featcache provenance; pass at least --model NAME (and --weights, --classes, "
                         "--data-root as they apply) to say what computed these embeddings")
    held_dim = prov.get("embed_dim")
    if held_dim is not None and int(held_dim) != src.dim:
        raise DataError(f"{str(src.main)!r}: its provenance says embed_dim={held_dim} but the embeddings have {src.dim} values; export it again")
    if src.dim < 1:
        raise DataError(f"{str(src.main)!r} holds no embedding values (dimension 0)")
    dtype = prov.get("dtype") if prov.get("dtype") in DTYPES else ("float16" if src.file_dtype == np.float16 else "float32")
    if "classes" in given:
        classes = list(given["classes"])
    elif "classes" in prov:
        classes = list(prov["classes"])
    elif CLASS in src.names:
        classes = _class_names(src)
    elif LABEL in src.names:
        raise UsageError(f"{str(src.table_file)!r} has labels but no class names (no {CLASS!r} column, no provenance); pass --classes a,b,... "
                         "in label order")
    else:
        classes = []
    if len(set(classes)) != len(classes):
        raise UsageError(f"--classes names a class twice ({', '.join(printable(c) for c in classes)}); each class once, in label order")
    rest = {k: v for k, v in prov.items() if k not in ("model", "weights", "preprocessing", "embed_dim", "dtype", "data_root", "layout", "classes", "imported")}
    pre = given.get("preprocessing", prov.get("preprocessing"))
    meta = new_cache_meta(str(model), src.dim, classes, weights=str(given.get("weights", prov.get("weights", "custom"))), preprocessing=pre,
                          dtype=dtype, data_root=str(given.get("data_root", prov.get("data_root", ""))), layout=str(given.get("layout", prov.get("layout", "flat"))),
                          **rest)
    origin = "file + command line" if src.provenance and given else ("file" if src.provenance else "command line")
    meta["imported"] = {"source": str(Path(src.main).resolve()), "format": src.fmt, "provenance_from": origin, "overrides": given,
                        "imported_at": timestamp(), **versions()}
    return meta, origin


def _labels(batch, classes: list[str], src: _Source, first: int, pa, pc) -> np.ndarray:
    """Label indices into ``classes``: by name from the class column, else the label column; -1 unlabeled."""
    n = batch.num_rows
    names = batch.schema.names
    shown_classes = ", ".join(printable(c) for c in classes[:20]) or "none"
    if CLASS in names:
        col = batch.column(CLASS).cast(pa.string())
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        idx = pc.index_in(col, value_set=pa.array(classes, pa.string()))
        unknown = pc.and_(idx.is_null(), col.is_valid()).to_numpy(zero_copy_only=False)
        if unknown.any():
            at = int(np.flatnonzero(unknown)[0])
            raise DataError(f"{src.where(first + at)}: class '{shown(col[at].as_py())}' is not among the classes ({shown_classes}); "
                            "pass --classes with every class name, in label order")
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    if LABEL in names:
        values = batch.column(LABEL).cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # null -> NaN; exact for any index that fits
        unlabeled = np.isnan(values)
        bad = ~unlabeled & ((values != np.round(values)) | (values < -1) | (values >= len(classes)))
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise DataError(f"{src.where(first + at)}: label {values[at]:g} is not a class index in -1..{len(classes) - 1} for the "
                            f"{len(classes)} classes ({shown_classes}); pass --classes in label order")
        return np.where(unlabeled, -1, values).astype(np.int32)
    return np.full(n, -1, np.int32)


def _splits(batch, src: _Source, first: int, pa, pc) -> np.ndarray | None:
    if SPLIT not in batch.schema.names:
        return None
    col = batch.column(SPLIT).cast(pa.string()).fill_null("")
    idx = pc.index_in(col, value_set=pa.array(SPLIT_VALUES, pa.string()))
    if idx.null_count:
        at = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src.where(first + at)}: split '{shown(col[at].as_py())}' is not one of train, val, test or empty")
    return idx.to_numpy(zero_copy_only=False).astype(np.uint8)


def _paths(batch, src: _Source, first: int, absolute_ok: bool, seen: set[bytes], skipped: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(UTF-8 paths of the rows to keep, which rows those are)``. Every path must pass
    ``row_path_problem`` (the rule folder scans and manifests follow; one bad path stops the
    import, naming its row); a path listed again is skipped and reported, the first listing
    kept, as a manifest's repeat is (``seen`` spans the whole source)."""
    texts = batch.column(src.path_col).to_pylist()
    keep = np.ones(len(texts), bool)
    kept: list[bytes] = []
    for i, text in enumerate(texts):
        if text is None:
            raise DataError(f"{src.where(first + i)}: no {src.path_col} (null); every row needs its file's path relative to the data root")
        problem = row_path_problem(text, absolute_ok=absolute_ok)
        if problem:
            raise DataError(f"{src.where(first + i)}: {src.path_col} '{shown(text)}' {problem}")
        raw = text.encode("utf-8")
        if raw in seen:
            keep[i] = False
            skipped.append((text, f"{src.table_file.name} row {first + i + 1:,}: {LISTED_AGAIN}"))
            continue
        seen.add(raw)
        kept.append(raw)
    return (np.array(kept, dtype="S") if kept else np.zeros(0, "S1")), keep


def import_cache(src: str | os.PathLike, out_cache: str | os.PathLike, *, model: str | None = None, weights: str | None = None,
                 classes: str | Sequence[str] | None = None, data_root: str | None = None, preprocessing: dict[str, Any] | str | None = None,
                 layout: str | None = None, wait: float = 0.0, progress: ProgressFn | None = None) -> ImportSummary:
    """Write the rows of an export (a folder written by ``export``, or a ``.parquet`` file with
    ``path`` and ``embedding`` columns) into the cache ``out_cache`` (created, or extended when
    it holds the same backbone). Arguments given replace the file's provenance; a file
    without provenance needs ``model``. ``preprocessing`` may be a dict or its JSON text. A
    path listed again is skipped and reported (``summary.skipped``), the first listing kept,
    as manifests do; ``seen`` paths are held for that (~100 bytes a row, like the metadata).

    Raises:
        UsageError: bad source or options, pyarrow missing. DataError: a column of the wrong
        type, bad rows (a path ``pipeline.names`` refuses, unknown class, bad label or split, NaN). IncompatibleError (exit 5): the cache holds
        another backbone. LockHeldError (exit 4), StorageError (exit 6).
    """
    pq = require_pyarrow("import")
    import pyarrow as pa
    import pyarrow.compute as pc

    fmt, main = detect_source(Path(src))
    source = _Source(fmt, main, pq)
    if isinstance(preprocessing, str):
        try:
            preprocessing = json.loads(preprocessing)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--preprocessing is not JSON ({exc.msg}); give e.g. '{{\"resize_size\": [224], \"crop_size\": [224]}}'") from None
    if isinstance(weights, str) and weights.strip().casefold() == "none":
        weights = "none"  # a seeded random init, spelled as extract spells it; other names are kept as given (not torchvision's)
    overrides = {"model": model, "weights": weights, "classes": _split_list(classes), "data_root": data_root, "preprocessing": preprocessing,
                 "layout": layout}
    meta, origin = _build_meta(source, overrides)
    dim, dtype = int(meta["embed_dim"]), np.dtype(meta["dtype"])
    if source.file_dtype != dtype:
        logger.info(f"note: {str(source.main)!r} holds {source.file_dtype.name} embeddings; the cache stores them as {dtype.name}")
    out_cache = Path(out_cache)
    if out_cache.is_dir():
        raise UsageError(f"--out {str(out_cache)!r} is a folder; pass the cache file to write (e.g. {str(out_cache / 'imported.h5')!r})")
    chunk = max(1, COMMIT_BYTES // (dim * max(dtype.itemsize, source.file_dtype.itemsize)))
    t0, done, imported = time.perf_counter(), 0, 0
    seen: set[bytes] = set()
    skipped: list[tuple[str, str]] = []
    with CacheWriter.open(out_cache, meta, wait=wait, command="import") as writer:
        for batch, emb in source.chunks(chunk):
            labels = _labels(batch, meta["classes"], source, done, pa, pc)
            split = _splits(batch, source, done, pa, pc)
            paths, keep = _paths(batch, source, done, meta["layout"] == "manifest", seen, skipped)
            emb = np.asarray(emb, dtype=dtype)
            if not np.isfinite(emb).all():
                bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
                path = batch.column(source.path_col)[bad].as_py()
                raise DataError(f"{source.where(done + bad, source.main)}: the embedding of '{shown(path)}' holds NaN or inf; "
                                "fix the source (no head can learn from it)")
            if not keep.all():
                emb, labels, split = emb[keep], labels[keep], (None if split is None else split[keep])
            writer.add_columns(paths, emb, labels=labels, split=split)
            writer.commit()
            done, imported = done + batch.num_rows, imported + len(paths)
            if progress is not None:
                progress(done, source.rows, time.perf_counter() - t0)
    summary = ImportSummary(str(out_cache), str(src), fmt, imported, writer.n_rows, dim, dtype.name, list(meta["classes"]), origin,
                            {k: v for k, v in overrides.items() if v is not None}, time.perf_counter() - t0, source_rows=done, skipped=skipped)
    return summary
