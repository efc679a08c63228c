"""A cache out as Parquet, or as ``embeddings.npy`` + ``metadata.parquet``, in bounded memory.

Rows are read with ``read_rows`` (the metadata, sorted by path: the order ``load_cache``
gives) and their embeddings streamed with ``iter_embeddings`` a chunk at a time (4 MiB of
embeddings by default); each chunk becomes one Parquet row group (and a slice of the
``.npy``), so memory follows the chunk and the row metadata, never the embeddings.

Every file is written under a temporary name in the output folder and renamed into place
once complete (``pipeline.store.atomic_path``): an error or a kill leaves the previous
export as it was (or, for the npy layout killed in the instant between its renames, no
``metadata.parquet``, which import reports as an incomplete export — never a mismatched pair).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StorageError, UsageError
from ..names import printable
from ..provenance import timestamp, versions
from ..store import TMP_MARK, atomic_path, iter_embeddings, read_rows, remove_stale_temporaries
from .layout import (
    CLASS,
    EMBEDDING,
    EXPORT_FORMATS,
    EXPORT_SCHEMA,
    LABEL,
    METADATA_FILE,
    NPY_FILE,
    PARQUET_FILE,
    PATH,
    PROVENANCE_FILE,
    SPLIT,
    SPLIT_NAMES,
    file_metadata,
    require_pyarrow,
)

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # embeddings per chunk (= per row group); the export holds a few chunks at a time, whatever the cache's size
MAX_ROW_GROUP_ROWS = 1 << 16

ProgressFn = Callable[[int, int, float], None]


@dataclass
class ExportSummary:
    """What ``export_cache`` wrote."""

    format: str
    out_dir: str
    files: list[str]
    cache: str
    rows: int
    embed_dim: int
    dtype: str
    row_groups: int
    embedding_bytes: int  # rows x dim x itemsize
    bytes_written: int  # every file's size
    seconds: float
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Embedding megabytes (10^6 bytes) exported per second."""
        return self.embedding_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1)}


def parse_splits(split: str | Sequence[str] | None) -> list[str] | None:
    """``"val"``, ``"train,val"`` or a list -> split names ("" for ``none``); None keeps every row."""
    if split is None:
        return None
    items = [s.strip().lower() for s in (split.split(",") if isinstance(split, str) else split)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in (*SPLIT_NAMES, "none")]
    if bad or not items:
        raise UsageError(f"--split {','.join(bad) or repr(split)!s}: choose from {', '.join(SPLIT_NAMES)} or none (rows without a split), comma-separated")
    return ["" if s == "none" else s for s in items]


def parse_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    """``"cat,dog"`` or a list -> class names; None keeps every row."""
    if classes is None:
        return None
    items = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes)]
    items = [c for c in items if c]
    if not items:
        raise UsageError("--classes is empty; name one or more classes, comma-separated (e.g. --classes cat,dog)")
    return items


def _select(table, splits: list[str] | None, wanted: list[str] | None, cache: Path) -> np.ndarray:
    """Positions (in path order) of the rows the filters keep."""
    keep = np.ones(len(table), bool)
    if splits is not None:
        keep &= np.isin(table.split, np.array(splits, dtype="U5"))
    if wanted is not None:
        classes = table.classes
        unknown = [c for c in wanted if c not in classes]
        if unknown:
            shown = ", ".join(printable(c) for c in classes[:20]) + (", …" if len(classes) > 20 else "")
            raise UsageError(f"--classes: {unknown[0]!r} is not a class of cache {str(cache)!r} (its classes: {shown or 'none'})")
        keep &= np.isin(table.labels, [classes.index(c) for c in wanted])
    return np.flatnonzero(keep)


def _check_space(out_dir: Path, need: int) -> None:
    """A disk without room for the export is refused before anything is written (StorageError, exit 6)."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # DIR may not exist yet
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # cannot tell: the writes will say
    if free < need + (1 << 20):
        raise StorageError(f"cannot write {str(out_dir)!r}: the disk is full ({free / 2**20:.1f} MiB free, about {need / 2**20:.1f} MiB needed); "
                           "nothing was changed, free some space and run again")


def _chunk_rows(dim: int, itemsize: int, row_group_rows: int | None) -> int:
    if row_group_rows is not None:
        if int(row_group_rows) < 1:
            raise UsageError(f"--row-group-rows {row_group_rows}: give a positive number of rows")
        return int(row_group_rows)
    return max(1, min(MAX_ROW_GROUP_ROWS, CHUNK_BYTES // max(1, dim * itemsize)))


def _arrow_types(pa, dtype: np.dtype, dim: int):
    value = pa.float16() if dtype == np.float16 else pa.float32()
    return pa.list_(pa.field("element", value, nullable=False), dim)


def _metadata_columns(pa, pc, table, rows: np.ndarray, classes_arr, splits_arr) -> list:
    """path, label, class, split of the rows at ``rows`` (positions in ``table``) as Arrow arrays."""
    at = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and rows[-1] - rows[0] + 1 == len(rows) else rows  # a run: no gather
    labels = np.asarray(table.labels[at], dtype=np.int32)
    try:
        path_arr = pa.array(table.paths_raw[at], type=pa.binary()).cast(pa.string())  # UTF-8 bytes: checked, not re-encoded
    except pa.ArrowInvalid:
        bad = next(p for p in table.paths_raw[at].tolist() if not _utf8(p))
        raise UsageError(f"cache {str(table.path)!r} holds the file name {bad!r}, which is not valid UTF-8 (Parquet strings must be): "
                         "rename the file, extract again, then export") from None
    class_arr = pc.take(classes_arr, pa.array(labels, mask=labels < 0)) if len(classes_arr) else pa.nulls(len(labels), pa.string())
    split = table.split[at]
    codes = np.zeros(len(split), np.int8)
    for code, name in enumerate(SPLIT_NAMES, 1):
        codes[split == name] = code
    return [path_arr, pa.array(labels, type=pa.int32()), class_arr, pc.take(splits_arr, pa.array(codes))]


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def export_cache(cache: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "parquet", *, split: str | Sequence[str] | None = None,
                 classes: str | Sequence[str] | None = None, row_group_rows: int | None = None, compression: str = "snappy",
                 progress: ProgressFn | None = None) -> ExportSummary:
    """Write the cache's rows (sorted by path, as ``load_cache`` orders them) to ``out_dir``:
    ``embeddings.parquet`` (``fmt="parquet"``) or ``embeddings.npy`` + ``metadata.parquet`` +
    ``provenance.json`` (``fmt="npy"``). ``split`` ("val", "train,val", "none") and ``classes``
    ("a,b") keep only those rows; ``row_group_rows`` overrides the chunk (default: 4 MiB of
    embeddings, at most 65,536 rows), which is also the memory the export needs beyond the
    rows' metadata. Files already in ``out_dir`` are replaced only once the new ones are complete.

    Raises:
        UsageError: unknown format, bad filter, ``out_dir`` is a file, pyarrow missing.
        CacheError (exit 5): not a cache, damaged. StorageError (exit 6): disk full, read-only folder.
    """
    fmt = str(fmt).strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    cache, out_dir = Path(cache), Path(out_dir)
    require_pyarrow(f"export --format {fmt}" + (f" (for its {METADATA_FILE})" if fmt == "npy" else ""))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} is a file; export writes a folder ({PARQUET_FILE} or {NPY_FILE} + {METADATA_FILE} in it): "
                         "choose another --out")
    splits, wanted = parse_splits(split), parse_classes(classes)
    t0 = time.perf_counter()
    with read_rows(cache) as table:
        meta = dict(table.meta)
        dim, dtype = int(meta["embed_dim"]), np.dtype(meta.get("dtype", "float32"))
        sel = _select(table, splits, wanted, cache)
        n = len(sel)
        filters = {"split": splits, "classes": wanted}
        if n == 0 and (splits is not None or wanted is not None):
            logger.warning(f"warning: no row of {str(cache)!r} matches the filters ({_describe(filters)}); the export is empty")
        export_info = {"format": fmt, "rows": n, "embed_dim": dim, "dtype": dtype.name, "cache": str(cache.resolve()), "generation": table.generation,
                       "filters": {k: v for k, v in filters.items() if v is not None}, **versions(),
                       "exported_at": timestamp(), "columns": [PATH, LABEL, CLASS, SPLIT, EMBEDDING]}
        kv = file_metadata(meta, export_info)
        chunk = _chunk_rows(dim, dtype.itemsize, row_group_rows)
        _check_space(out_dir, n * dim * dtype.itemsize + n * 64 + (1 << 20))
        names, groups = _write(fmt, table, sel, out_dir, kv, meta, export_info, chunk, compression, progress, t0)
    seconds = time.perf_counter() - t0
    files = [str(out_dir / name) for name in names]
    return ExportSummary(fmt, str(out_dir), files, str(cache), n, dim, dtype.name, groups, n * dim * dtype.itemsize, sum(Path(f).stat().st_size for f in files),
                         seconds, {k: v for k, v in filters.items() if v is not None})


def _write(fmt: str, table, sel: np.ndarray, out_dir: Path, kv: dict[bytes, bytes], meta: dict[str, Any], export_info: dict[str, Any], chunk: int,
           compression: str, progress: ProgressFn | None, t0: float) -> tuple[tuple[str, ...], int]:
    """Stream the rows at ``sel`` into the layout's files (temporaries, renamed when complete):
    ``(file names, row groups)``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n, dim, dtype = len(sel), int(meta["embed_dim"]), np.dtype(meta.get("dtype", "float32"))
    fields = [pa.field(PATH, pa.string(), nullable=False), pa.field(LABEL, pa.int32(), nullable=False), pa.field(CLASS, pa.string()),
              pa.field(SPLIT, pa.string(), nullable=False)]
    emb_type = _arrow_types(pa, dtype, dim)
    if fmt == "parquet":
        schema = pa.schema([*fields, pa.field(EMBEDDING, emb_type, nullable=False)], metadata=kv)
        names: tuple[str, ...] = (PARQUET_FILE,)
    else:
        schema = pa.schema(fields, metadata=kv)
        names = (METADATA_FILE, NPY_FILE, PROVENANCE_FILE)  # metadata.parquet first: it is renamed into place last
    for name in names:  # leftovers of exports killed mid-write (a live export's are kept)
        remove_stale_temporaries(out_dir, name + TMP_MARK)
    classes_arr = pa.array(table.classes, type=pa.string())
    splits_arr = pa.array(["", *SPLIT_NAMES], type=pa.string())  # the split codes 0..3

    def batches() -> Iterator[tuple[slice, np.ndarray, Any]]:
        for pos, emb in iter_embeddings(table, table.index_rows[sel], chunk):
            cols = _metadata_columns(pa, pc, table, sel[pos], classes_arr, splits_arr)
            emb = np.ascontiguousarray(emb, dtype=dtype)
            if fmt == "parquet":
                cols.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), type=emb_type))
            yield pos, emb, pa.record_batch(cols, schema=schema)

    groups = 0
    with contextlib.ExitStack() as stack:  # leaving it renames every file, the first name last; an error removes every temporary
        tmp = {name: stack.enter_context(atomic_path(out_dir / name)) for name in names}
        writer = pq.ParquetWriter(str(tmp[names[0]]), schema, compression=compression, use_dictionary=[CLASS, SPLIT],
                                  write_statistics=[PATH, LABEL, CLASS, SPLIT])
        npy = open(tmp[NPY_FILE], "wb") if fmt == "npy" else None
        try:
            if npy is not None:
                np.lib.format.write_array_header_1_0(npy, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)})
            for pos, emb, batch in read_ahead(batches):  # the next chunk is read while this one is written
                if npy is not None:
                    npy.write(memoryview(emb).cast("B"))
                writer.write_batch(batch, row_group_size=batch.num_rows)
                groups += 1
                if progress is not None:
                    progress(pos.stop, n, time.perf_counter() - t0)
        finally:
            writer.close()
            if npy is not None:
                npy.close()
        if fmt == "npy":
            doc = {"schema": EXPORT_SCHEMA, "provenance": meta, "export": export_info}
            tmp[PROVENANCE_FILE].write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
            (out_dir / METADATA_FILE).unlink(missing_ok=True)  # the old commit marker goes first; the new one comes last, complete
    return names, groups


def read_ahead(produce: Callable[[], Iterator[Any]], depth: int = 1) -> Iterator[Any]:
    """``produce()``'s items, computed in a thread ``depth`` items ahead of the consumer: reading
    and decoding the cache (h5py holds the GIL) overlaps writing (pyarrow and ``write`` release
    it). Memory: ``depth + 2`` items. An error in the thread is raised here; leaving the loop
    early (an error, Ctrl-C) stops the thread before this returns."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce():
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Raised(exc))

    thread = threading.Thread(target=run, name="featcache-export-read", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _describe(filters: dict[str, Any]) -> str:
    parts = []
    if filters.get("split") is not None:
        parts.append("--split " + ",".join(s or "none" for s in filters["split"]))
    if filters.get("classes") is not None:
        parts.append("--classes " + ",".join(filters["classes"]))
    return " ".join(parts)
