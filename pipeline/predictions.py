"""Where predictions go: CSV, JSON lines or Parquet (by the file's suffix), streamed batch by
batch and written atomically — a million rows are never held as Python objects, and an
interrupted run leaves no half file.

Every format has the same columns: ``path``, ``predicted`` (the top class), ``probability``
(its probability), the top-k classes and probabilities, ``true`` (the class the folder or
manifest names, when it is one the head knows) and, in Parquet only, the ``embedding``.
CSV holds the top-k in one cell (``cat:0.9132;dog:0.0412``), JSON lines as a list of
``{"class", "probability"}``, Parquet as two list columns (``topk_classes``,
``topk_probabilities``), as timm's ``inference.py`` writes them.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .store import atomic_path

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
CSV_FIELDS = ["path", "predicted", "probability", "topk", "true"]
PARQUET_ROWS_PER_GROUP = 65_536


def output_format(path: str | os.PathLike, with_embeddings: bool = False) -> str:
    """The format ``path``'s suffix names; a usage error for any other suffix."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {str(path)!r}: the format comes from the suffix; use .csv, .jsonl or .parquet")
    if with_embeddings and fmt != "parquet":
        raise UsageError(f"--with-embeddings writes the embedding column to Parquet only; use --out {Path(path).with_suffix('.parquet')}")
    if fmt == "parquet":
        from .exchange import require_pyarrow

        require_pyarrow("--out FILE.parquet")
    return fmt


@dataclass
class Scored:
    """One batch of predictions, as arrays: ``top`` [B, k] class indices (best first) and
    ``top_p`` [B, k] their probabilities; ``true`` the named class (or '') per row."""

    paths: Sequence[str]
    top: np.ndarray
    top_p: np.ndarray
    true: Sequence[str]
    embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, classes: Sequence[str]) -> list[dict[str, Any]]:
        """As dicts (for the few rows a caller keeps: a preview, the grid, --json without --out)."""
        return [{"path": p, "predicted": classes[t[0]], "probability": float(q[0]), "true": true,
                 "topk": [{"class": classes[j], "probability": float(v)} for j, v in zip(t, q)]}
                for p, t, q, true in zip(self.paths, self.top.tolist(), self.top_p.tolist(), self.true)]


def score(proba: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each row, best first (ties: the lower class index),
    and their probabilities."""
    k = min(k, proba.shape[1])
    if k < proba.shape[1]:  # the k best of each row first (linear), then only those sorted
        part = np.argpartition(-proba, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # class order, so the stable sort below breaks ties by class index
        order = np.take_along_axis(part, np.argsort(-np.take_along_axis(proba, part, axis=1), axis=1, kind="stable"), axis=1)
    else:
        order = np.argsort(-proba, axis=1, kind="stable")
    return order, np.take_along_axis(proba, order, axis=1)


class PredictionWriter:
    """Streams ``Scored`` batches into ``path`` (format from its suffix); the file appears,
    complete, on :meth:`close` — never on :meth:`abort` or an exception in a ``with`` block."""

    def __init__(self, path: str | os.PathLike, classes: Sequence[str], with_embeddings: bool = False):
        self.path, self.classes = Path(path), list(classes)
        self.format = output_format(self.path, with_embeddings)
        self.with_embeddings = with_embeddings
        self.rows = 0
        self._stack = ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self._fh: io.TextIOBase | None = None
        self._csv = None
        self._parquet = None
        self._pending: list[Scored] = []
        if self.format in ("csv", "jsonl"):
            self._fh = open(self._tmp, "w", newline="", encoding="utf-8")
            if self.format == "csv":
                self._csv = csv.writer(self._fh)
                self._csv.writerow(CSV_FIELDS)

    def write(self, batch: Scored) -> None:
        if not len(batch):
            return
        self.rows += len(batch)
        names = self.classes
        if self.format == "csv":
            self._csv.writerows([p, names[t[0]], f"{q[0]:.6g}", ";".join(f"{names[j]}:{v:.4f}" for j, v in zip(t, q)), true]
                                for p, t, q, true in zip(batch.paths, batch.top.tolist(), batch.top_p.tolist(), batch.true))
        elif self.format == "jsonl":
            self._fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in batch.rows(names))
        else:
            self._pending.append(batch)
            if sum(len(b) for b in self._pending) >= PARQUET_ROWS_PER_GROUP:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        batches, self._pending = self._pending, []
        names = np.array(self.classes, dtype=object)
        top = np.concatenate([b.top for b in batches])
        top_p = np.concatenate([b.top_p for b in batches]).astype(np.float32)
        k = top.shape[1]
        offsets = pa.array(np.arange(0, len(top) * k + 1, k, dtype=np.int32))
        columns = {
            "path": pa.array([p for b in batches for p in b.paths], pa.string()),
            "predicted": pa.array(names[top[:, 0]].tolist(), pa.string()),
            "probability": pa.array(top_p[:, 0]),
            "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(names[top.ravel()].tolist(), pa.string())),
            "topk_probabilities": pa.ListArray.from_arrays(offsets, pa.array(top_p.ravel())),
            "true": pa.array([t or None for b in batches for t in b.true], pa.string()),
        }
        if self.with_embeddings:
            emb = np.concatenate([b.embeddings for b in batches]).astype(np.float32)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        table = pa.table(columns)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self._tmp), table.schema)
        self._parquet.write_table(table)

    def close(self) -> Path:
        """Finish the file and put it in place; returns its path."""
        try:
            if self.format == "parquet":
                self._flush_parquet()
                if self._parquet is None:  # no rows: an empty file with the columns still loads
                    self._write_empty_parquet()
                else:
                    self._parquet.close()
            else:
                self._fh.close()
        except BaseException as exc:
            self.abort(exc)
            raise
        self._stack.close()
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the temporary file: nothing appears at ``path``."""
        for closing in (self._fh, self._parquet):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # noqa: BLE001 - discarding anyway
                pass
        error = exc if exc is not None else RuntimeError("prediction output aborted")
        self._stack.__exit__(type(error), error, error.__traceback__)

    def _write_empty_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = [("path", pa.string()), ("predicted", pa.string()), ("probability", pa.float32()), ("topk_classes", pa.list_(pa.string())),
                  ("topk_probabilities", pa.list_(pa.float32())), ("true", pa.string())]
        pq.write_table(pa.schema(fields).empty_table(), str(self._tmp))

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def concatenate(parts: Sequence[Path], out: Path, fmt: str) -> None:
    """Rank outputs (each complete, in rank order) into one file, atomically and streamed."""
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            writer = None
            for part in parts:
                source = pq.ParquetFile(str(part))
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    writer = writer or pq.ParquetWriter(str(tmp), table.schema)
                    writer.write_table(table)
            if writer is None:
                import shutil

                shutil.copyfile(parts[0], tmp)
            else:
                writer.close()
            return
        with open(tmp, "wb") as dst:
            for k, part in enumerate(parts):
                with open(part, "rb") as src:
                    if fmt == "csv" and k:
                        src.readline()  # each rank's file has the header
                    while block := src.read(1 << 20):
                        dst.write(block)
