"""Scoring a saved head on cached rows: on its own data the val and test rows of the split
it was fitted with, on another dataset of the same backbone every labelled row. ``evaluate``
and the report score through here."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..store import read_rows
from .artifacts import LoadedHead, load_head
from .fit import full_proba, read_embeddings
from .metrics import RunningMetrics
from .splits import split_as_recorded

SCORE_ROWS = 8192  # rows scored at a time (the head's standardisation and logits are copies of them)


@dataclass
class Scored:
    """The head's predictions on the rows it is evaluated on."""

    groups: dict[str, np.ndarray]  # "val"/"test" (its own data) or "all" (another dataset) -> row indices
    proba: dict[str, np.ndarray]
    metrics: dict[str, dict[str, Any]]
    train: np.ndarray  # rows the head was fitted on (empty for another dataset)


def score_head(loaded: LoadedHead, rows_of: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, split: np.ndarray, same_data: bool,
               classes: Sequence[str], keep_proba: bool = True) -> Scored:
    """Metrics (and with ``keep_proba`` the probabilities) of ``loaded``'s head on the rows it
    is evaluated on; ``rows_of(indices)`` gives their embeddings, read and scored a chunk at a
    time, so without ``keep_proba`` memory does not follow the number of rows."""
    if same_data:
        groups = {s: np.flatnonzero(split == s) for s in ("val", "test")}
        train = np.flatnonzero(split == "train")
    else:  # another dataset of the same backbone: every labelled row is new to the head
        groups, train = {"all": np.flatnonzero(labels >= 0)}, np.zeros(0, dtype=np.int64)
    groups = {s: rows for s, rows in groups.items() if len(rows)}
    proba: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for s, rows in groups.items():
        running, kept = RunningMetrics(list(classes)), []
        for c in range(0, len(rows), SCORE_ROWS):
            chunk = rows[c : c + SCORE_ROWS]
            p = full_proba(loaded.head, np.asarray(rows_of(chunk), dtype=np.float32), len(classes))
            running.add(labels[chunk], p)
            if keep_proba:
                kept.append(p)
        metrics[s] = running.result()
        if keep_proba:
            proba[s] = np.concatenate(kept)
    return Scored(groups, proba, metrics, train)


def evaluate_head(head_path: str | os.PathLike, cache: str | os.PathLike, val_fraction: float | None = None) -> dict[str, Any]:
    """Re-score a saved head on a compatible cache: its val/test rows by the head's split rule,
    or every labelled row when the cache is another dataset (different data root)."""
    loaded: LoadedHead = load_head(head_path)
    cache = Path(cache)
    table = read_rows(cache)
    loaded.check_cache(table.meta, cache)
    if not (table.labels >= 0).any():
        raise UsageError(f"cache {str(cache)!r} has no labelled rows to evaluate on")
    same_data = table.meta.get("data_root") == loaded.provenance.get("data_root")
    split = split_as_recorded(loaded.provenance, table.paths, table.labels, table.split, val_fraction)
    dim = int(table.meta["embed_dim"])
    scored = score_head(loaded, lambda rows: read_embeddings(table, table.index_rows[rows], dim), table.labels, split, same_data, table.classes,
                        keep_proba=False)
    return {"head": str(head_path), "cache": str(cache), "kind": loaded.kind, **scored.metrics}
