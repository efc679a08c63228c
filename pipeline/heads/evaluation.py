"""Scoring a saved head on cached rows: on its own data the val and test rows of the split
it was fitted with, on another dataset of the same backbone every labelled row. ``evaluate``
and the report score through here."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..distributed import World, launched_by_torchrun, world
from ..errors import UsageError
from ..memory import budget_bytes, check_budget, rows_per_chunk, say_streaming, working_budget
from ..store import read_rows
from .artifacts import LoadedHead, load_head
from .fit import full_proba, read_embeddings
from .metrics import RunningMetrics
from .splits import split_as_recorded

SCORE_ROWS = 8192  # rows scored at a time by default
SCORE_COPIES = 3  # a chunk's rows as read, as float32, and standardised


@dataclass
class Scored:
    """The head's predictions on the rows it is evaluated on."""

    groups: dict[str, np.ndarray]  # "val"/"test" (its own data) or "all" (another dataset) -> row indices
    proba: dict[str, np.ndarray]  # group -> probabilities of the rows ``kept`` names
    metrics: dict[str, dict[str, Any]]
    train: np.ndarray  # rows the head was fitted on (empty for another dataset)
    kept: dict[str, np.ndarray] = field(default_factory=dict)  # group -> the rows whose probabilities ``proba`` holds


KEEP = ("all", "mistakes", "none")


def score_head(loaded: LoadedHead, rows_of: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, split: np.ndarray, same_data: bool,
               classes: Sequence[str], keep: str = "all", chunk_rows: int = SCORE_ROWS, world: World | None = None,
               storage: np.ndarray | None = None) -> Scored:
    """Metrics of ``loaded``'s head on the rows it is evaluated on, and the probabilities of
    ``keep``: every row, only the misclassified ones (a report), or none (``evaluate``).
    ``rows_of(indices)`` gives their embeddings, read and scored a chunk at a time, so with
    ``none`` memory does not follow the number of rows, and with ``mistakes`` only the errors'.
    Under torchrun (``world``, with ``keep="none"``) each rank scores a contiguous share of
    each group and the counts are summed: every rank returns the metrics of all the rows.
    ``storage`` (a cache's ``index_rows``), with ``keep="none"``: each group is read in the
    order its rows lie in the cache, each chunk one run of the file (in path order a chunk of
    a 10 M-row cache's val rows was thousands of reads: evaluate took 440 s)."""
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r}: one of {KEEP}")
    if same_data:
        groups = {s: np.flatnonzero(split == s) for s in ("val", "test")}
        train = np.flatnonzero(split == "train")
    else:  # another dataset of the same backbone: every labelled row is new to the head
        groups, train = {"all": np.flatnonzero(labels >= 0)}, np.zeros(0, dtype=np.int64)
    groups = {s: rows for s, rows in groups.items() if len(rows)}
    proba: dict[str, np.ndarray] = {}
    kept_rows: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    w = world if world is not None and world.enabled else None
    if w is not None and keep != "none":
        raise ValueError("score_head shares rows across ranks only with keep='none'")
    for s, rows in groups.items():
        if storage is not None and keep == "none":  # the metrics are sums: any order gives them
            rows = rows[np.argsort(storage[rows], kind="stable")]
        if w is not None:
            rows = np.array_split(rows, w.size)[w.rank]
        running, kept, which = RunningMetrics(list(classes)), [], []
        for c in range(0, len(rows), chunk_rows):
            chunk = rows[c : c + chunk_rows]
            p = full_proba(loaded.head, np.asarray(rows_of(chunk), dtype=np.float32), len(classes))
            running.add(labels[chunk], p)
            if keep != "none":
                pick = slice(None) if keep == "all" else p.argmax(axis=1) != labels[chunk]
                kept.append(p[pick])
                which.append(chunk[pick])
        if w is not None:
            running = RunningMetrics(list(classes)).merge(w.gather(running))
        metrics[s] = running.result()
        if keep != "none":
            proba[s] = np.concatenate(kept)
            kept_rows[s] = np.concatenate(which)
    return Scored(groups, proba, metrics, train, kept_rows)


def score_chunk_rows(budget: int, dim: int, n_classes: int, *, rows: int = 0, command: str = "", most: int | None = None,
                     held: int = 0, stated: int | None = None) -> int:
    """Rows scored at a time under a memory budget of ``budget`` bytes (their copies and
    probabilities; at most ``most``). With ``command``, says so when ``rows`` rows exceed the
    budget (the message counts the ``held`` bytes of the cache's table against the ``stated`` budget)."""
    row_bytes = dim * 4 * SCORE_COPIES + 8 * n_classes
    chunk = min(rows_per_chunk(budget, row_bytes), most or 2**62)
    if command and rows * row_bytes > budget:
        say_streaming(command, rows * row_bytes + held, stated or budget, f"scoring {chunk:,} rows at a time")
    return chunk


def evaluate_head(head_path: str | os.PathLike, cache: str | os.PathLike, val_fraction: float | None = None, memory_budget: str = "auto") -> dict[str, Any]:
    """Re-score a saved head on a compatible cache: its val/test rows by the head's split rule,
    or every labelled row when the cache is another dataset (different data root). The rows are
    read and scored in chunks sized from ``memory_budget`` (``pipeline.memory``)."""
    budget = budget_bytes(check_budget(memory_budget))
    loaded: LoadedHead = load_head(head_path)
    cache = Path(cache)
    table = read_rows(cache)
    loaded.check_cache(table.meta, cache)
    if not (table.labels >= 0).any():
        raise UsageError(f"cache {str(cache)!r} has no labelled rows to evaluate on")
    same_data = table.meta.get("data_root") == loaded.provenance.get("data_root")
    split = split_as_recorded(loaded.provenance, table.paths, table.labels, table.split, val_fraction)
    dim = int(table.meta["embed_dim"])
    stated, budget = budget, working_budget(budget, table.nbytes)  # the table's paths, labels and hashes count against it
    chunk = score_chunk_rows(budget, dim, len(table.classes), rows=len(table), command="evaluate", held=table.nbytes, stated=stated)
    w = world("cpu") if launched_by_torchrun() else None  # torchrun: each rank scores its share, the counts are summed
    scored = score_head(loaded, lambda rows: read_embeddings(table, table.index_rows[rows], dim), table.labels, split, same_data, table.classes,
                        keep="none", chunk_rows=chunk, world=w, storage=table.index_rows)
    return {"head": str(head_path), "cache": str(cache), "kind": loaded.kind, **scored.metrics}
