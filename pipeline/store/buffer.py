"""A writer's changes not yet committed: rows, failed files and removals, in arrival order.

Each change takes a sequence number, so that when one commit holds several changes of a path
(a row, then a failure, then a removal...) only the last one lands (:meth:`ChangeBuffer.resolve`).
Rows stay as columns (no Python object per row).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .columns import FailureColumns, RowColumns, encode_paths, path_keys


@dataclass
class PendingRow:
    """One embedded file: its path relative to the data root (``/``-separated), label (index
    into the writer's ``meta['classes']``, -1 = unlabeled), split (``""``, ``train``, ``val``
    or ``test``), file size and mtime (for incremental runs) and SHA-256 (hex, or ``""``)."""

    relpath: str
    label: int = -1
    split: str = ""
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""


class ChangeBuffer:
    """Buffered rows (with embeddings ``dim`` wide, of ``dtype``), failures and removals."""

    def __init__(self, dim: int, dtype: str):
        self.dim, self.dtype = dim, dtype
        self.rows: list[RowColumns] = []
        self.embeddings: list[np.ndarray] = []
        self.row_seq: list[np.ndarray] = []
        self.failed: dict[str, tuple[str, int, int, int]] = {}  # path -> (reason, size, mtime_ns, seq)
        self.removed: dict[str, int] = {}  # path -> seq
        self.n_rows = 0
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.failed or self.removed)

    def add_rows(self, cols: RowColumns, emb: np.ndarray) -> None:
        self.rows.append(cols)
        self.embeddings.append(emb)
        self.row_seq.append(np.arange(self._seq, self._seq + len(cols)))
        self._seq += len(cols)
        self.n_rows += len(cols)

    def add_failure(self, relpath: str, reason: str, size: int, mtime_ns: int) -> None:
        self.failed[relpath] = (reason, int(size), int(mtime_ns), self._seq)
        self._seq += 1

    def remove(self, relpaths: Sequence[str]) -> None:
        for p in relpaths:
            self.removed[p] = self._seq
            self._seq += 1

    def take_failures(self) -> dict[str, tuple[str, int, int]]:
        """The buffered failures (relpath -> (reason, size, mtime_ns)), no longer buffered."""
        out = {p: (r, s, m) for p, (r, s, m, _) in self.failed.items()}
        self.failed = {}
        return out

    def clear_rows(self) -> None:
        self.rows, self.embeddings, self.row_seq, self.n_rows = [], [], [], 0

    def resolve(self, rows_only: bool = False) -> tuple[RowColumns, np.ndarray, FailureColumns, np.ndarray]:
        """The buffer as it should land: for each path only its last change (row, failure or
        removal). Returns (rows, embeddings, failures, keys of every path changed)."""
        rows = RowColumns.concat(self.rows)
        emb = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, self.dim), self.dtype)
        rseq = np.concatenate(self.row_seq) if self.row_seq else np.zeros(0, np.int64)
        fitems = [] if rows_only else list(self.failed.items())
        ritems = [] if rows_only else list(self.removed.items())
        fails = FailureColumns.build([(p, r, s, m) for p, (r, s, m, _) in fitems])
        rkeys = path_keys(encode_paths([p for p, _ in ritems]))
        keys = np.concatenate([rows.keys, fails.keys, rkeys]).reshape(-1, 2)
        seq = np.concatenate([rseq, np.array([q for _, (_, _, _, q) in fitems], np.int64), np.array([q for _, q in ritems], np.int64)])
        kind = np.concatenate([np.zeros(len(rows), np.int8), np.ones(len(fails), np.int8), np.full(len(ritems), 2, np.int8)])
        local = np.concatenate([np.arange(len(rows)), np.arange(len(fails)), np.arange(len(ritems))])
        if not len(keys):
            return rows, emb, fails, keys
        order = np.lexsort((seq, keys[:, 1], keys[:, 0]))
        k = keys[order]
        last = np.ones(len(order), bool)
        last[:-1] = (k[1:] != k[:-1]).any(axis=1)
        win = order[last]
        keep_rows = np.sort(local[win][kind[win] == 0])
        keep_fails = np.sort(local[win][kind[win] == 1])
        return rows.take(keep_rows), emb[keep_rows], fails.take(keep_fails), keys[win]
