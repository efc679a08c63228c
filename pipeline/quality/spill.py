"""Row matrices too large to hold: the cache's embeddings read where they lie, and the audit's
projected rows spilled to a temporary file. Both index like the arrays the checks take
(``rows[a:b]``, ``rows[i]``, ``rows[[i, j, ...]]``, ``rows[idx, :2]``, ``len``, ``shape``), so the
same code runs on rows in memory and on rows on disk, reading one block at a time.

The spill file is created beside the cache (its folder, when writable; else the system's
temporary folder) and unlinked at once: it has no name while the audit runs, so a crash,
``kill -9`` or full disk leaves nothing behind, and the space returns when the process ends.
It is read with ``os.pread`` rather than mapped, so the rows read do not count towards the
process's resident memory (a mapping's pages would: 5 GB of them at 10 M x 128).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..store import RowTable, ensure_free_space, storage_error

RUN_ROWS = 16_384  # ids gathered by one read of a spill


def _rows_and_columns(key: Any) -> tuple[Any, Any]:
    if isinstance(key, tuple):
        return key[0], key[1] if len(key) > 1 else slice(None)
    return key, slice(None)


class _Indexed:
    """``__getitem__`` over ``_read_range(a, b)`` and ``_read_rows(sorted unique ids)``."""

    shape: tuple[int, int]
    dtype: np.dtype
    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _read_range(self, a: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = _rows_and_columns(key)
        if isinstance(rows, slice):
            a, b, step = rows.indices(len(self))
            out = self._read_range(a, max(a, b))[::step]
        elif np.isscalar(rows):
            r = int(rows) + (len(self) if int(rows) < 0 else 0)
            if not 0 <= r < len(self):
                raise IndexError(f"row {int(rows)} outside 0..{len(self) - 1}")
            out = self._read_range(r, r + 1)[0]
            return out[cols]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64)
            uniq, inverse = np.unique(idx, return_inverse=True)
            out = self._read_rows(uniq)[inverse.ravel()] if len(uniq) else np.empty((0, self.shape[1]), self.dtype)
        return out[:, cols]


class CacheRows(_Indexed):
    """A cache version's embeddings in its table's order (``read_rows``: by path), read on demand."""

    def __init__(self, table: RowTable):
        self.table = table
        self.shape = (len(table), int(table.meta["embed_dim"]))
        self.dtype = np.dtype(table.meta.get("dtype", "float32"))

    def _read_ids(self, positions: np.ndarray) -> np.ndarray:
        ids = self.table.index_rows[positions]
        order = np.argsort(ids, kind="stable")
        out = np.empty((len(ids), self.shape[1]), dtype=self.dtype)
        self.table.snapshot.read_into(out, ids[order], order)
        return out

    def _read_range(self, a: int, b: int) -> np.ndarray:
        return self._read_ids(np.arange(a, b))

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._read_ids(ids)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def storage_order(self) -> np.ndarray:
        """The table's positions in the order their rows lie in the cache: read chunk by chunk
        in this order, every chunk is one run of the file (in the table's order, by path, a
        chunk gathers rows from all over it: a 10 M-row audit's first pass had not ended after 8 minutes)."""
        return np.argsort(self.table.index_rows, kind="stable")


class SpilledRows(_Indexed):
    """A [rows, cols] matrix (float32 unless ``dtype`` says) written block by block to an
    unlinked temporary file (module doc)."""

    def __init__(self, rows: int, cols: int, beside: Path, label: str = "rows", dtype: Any = np.float32):
        self.shape, self.dtype = (int(rows), int(cols)), np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        folder = Path(beside).parent if Path(beside).parent.is_dir() and os.access(Path(beside).parent, os.W_OK) else Path(tempfile.gettempdir())
        self.folder, self.beside = folder, Path(beside)
        target = self.target = folder / f".{Path(beside).name}.audit-{label}"
        ensure_free_space(target, self.shape[0] * self.row_bytes)
        fd, name = tempfile.mkstemp(prefix=target.name + "-", dir=folder)
        os.unlink(name)
        self.fd, self.written = fd, 0

    def append(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype)
        if data.ndim != 2 or data.shape[1] != self.shape[1] or self.written + len(data) > self.shape[0]:
            raise ValueError(f"block {data.shape} does not fit a [{self.shape[0]}, {self.shape[1]}] spill at row {self.written}")
        self._write(data, self.written)
        self.written += len(data)

    def _write(self, data: np.ndarray, row: int) -> None:
        view = memoryview(data).cast("B")
        offset, done = row * self.row_bytes, 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:  # the disk filled up after the check: one clear line, and the space returns as the file closes
            self.close()
            raise storage_error(exc, self.target) from None

    def write_at(self, positions: np.ndarray, block: np.ndarray) -> None:
        """Rows ``block`` at rows ``positions`` (distinct, any order), each run of consecutive
        positions in one write: a cache's chunk read in storage order lands in the table's order."""
        order = np.argsort(positions, kind="stable")
        pos, data = np.asarray(positions, dtype=np.int64)[order], np.ascontiguousarray(np.asarray(block, dtype=self.dtype)[order])
        if len(pos) and (pos[0] < 0 or pos[-1] >= self.shape[0]):
            raise IndexError(f"rows {pos[0]}..{pos[-1]} outside a spill of {self.shape[0]}")
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        for s, e in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(pos)].tolist()):
            self._write(data[s:e], int(pos[s]))
        self.written += len(pos)

    def _read_range(self, a: int, b: int) -> np.ndarray:
        if b > self.written:
            raise IndexError(f"rows {a}..{b} not written yet ({self.written} of {self.shape[0]})")
        out = np.empty((b - a, self.shape[1]), dtype=self.dtype)
        view, offset, done = memoryview(out).cast("B"), a * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"spill file ended at byte {offset + done}")
            done += got
        return out

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        """Sorted unique rows: runs read whole, sparse stretches read row by row."""
        out = np.empty((len(ids), self.shape[1]), dtype=self.dtype)
        brk = np.flatnonzero(np.diff(ids) > 64) + 1  # gaps of up to 64 rows are read through: one read beats many
        brk = np.union1d(brk, np.arange(RUN_ROWS, len(ids), RUN_ROWS))  # and no read holds more than RUN_ROWS ids
        for s, e in zip(np.r_[0, brk].tolist(), np.r_[brk, len(ids)].tolist()):
            lo, hi = int(ids[s]), int(ids[e - 1]) + 1
            out[s:e] = self._read_range(lo, hi)[ids[s:e] - lo]
        return out

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SpilledRows:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Subset(_Indexed):
    """Rows ``idx`` of ``base`` (an array or rows on disk), indexed from 0, read on demand."""

    def __init__(self, base: Any, idx: np.ndarray):
        self.base, self.idx = base, np.asarray(idx, dtype=np.int64)
        self.shape, self.dtype = (len(self.idx), base.shape[1]), np.dtype(base.dtype)

    def _read_range(self, a: int, b: int) -> np.ndarray:
        return self.base[self.idx[a:b]]

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.base[self.idx[ids]]


def rows_of(base: Any, idx: np.ndarray) -> Any:
    """``base[idx]``: a copy for rows in memory, a view read on demand for rows on disk."""
    return base[idx] if isinstance(base, np.ndarray) else Subset(base, idx)
