"""Stage 2: fit a head on a cache, score it, save it with provenance; compare caches."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import World, launched_by_torchrun, world
from ..errors import UsageError
from ..memory import chunk_bytes, human, say_streaming, working_budget
from ..options import build
from ..provenance import inherited, timestamp, versions
from ..store import SCHEMA_VERSION, RowTable, WriterLock, ensure_free_space, iter_embeddings, payload_bytes, read_cache_meta, read_rows
from .artifacts import save_head
from .estimators import ArraySource, TorchHead, batch_share, make_head
from .knn import KNNHead
from .metrics import REPORTS_NEED, RunningMetrics, classification_metrics, clear_reports, kept_epoch, plot_leaderboard, write_reports
from .options import FitOptions
from .splits import SplitRule, assign_splits

logger = logging.getLogger(__name__)

DISTRIBUTED_HEADS = ("logreg", "linear", "mlp")  # the heads torchrun splits across ranks
SCORE_COPIES = 6  # [rows, classes] tensors of a streamed logreg chunk: logits, log-softmax, probabilities and their gradients
IN_MEMORY_COPIES = 3  # an in-memory logreg holds the float32 rows and their float64 standardised copy (12 bytes a value)


class CacheSource:
    """Rows of a cache streamed in chunks (shuffled chunk order, shuffled within chunk), all
    from the table's own cache version (a compaction meanwhile changes nothing it reads)."""

    def __init__(self, table: RowTable, index_rows: np.ndarray, labels: np.ndarray, chunk_rows: int = 16384):
        order = np.argsort(index_rows)
        self.table, self.rows, self.y = table, np.asarray(index_rows)[order], np.asarray(labels)[order]
        self.n_rows, self.chunk_rows = len(self.rows), chunk_rows

    def shares(self, batch_size, shuffle, rng, rank=0, size=1) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        """``BatchSource.shares``: each chunk's batches are drawn alike on every rank, and a
        rank reads only its rows of them (one read a chunk)."""
        starts = np.arange(0, self.n_rows, self.chunk_rows)
        if shuffle:
            starts = rng.permutation(starts)
        for s in starts:
            rows, y = self.rows[s : s + self.chunk_rows], self.y[s : s + self.chunk_rows]
            order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
            batches = [order[i : i + batch_size] for i in range(0, len(rows), batch_size)]
            parts = [batch_share(b, rank, size) for b in batches]
            need = np.unique(np.concatenate([idx for _, idx in parts]))  # sorted: the rank's rows of this chunk
            X = np.empty((0, 0), dtype=np.float32)
            if len(need):
                (_, X), = iter_embeddings(self.table, rows[need], chunk_rows=len(need))
            for b, (first, idx) in zip(batches, parts):
                yield X[np.searchsorted(need, idx)].astype(np.float32), y[idx], first, y[b]

    def batches(self, batch_size, shuffle, rng) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for X, y, _, _ in self.shares(batch_size, shuffle, rng):
            yield X, y

    def moments(self, world: World | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of every column; under torchrun each rank sums its
        contiguous share and the sums are added."""
        w = world or World()
        dim = int(self.table.meta["embed_dim"])
        total, total_sq = np.zeros(dim), np.zeros(dim)  # a rank without rows adds zeros
        for _, X in iter_embeddings(self.table, np.array_split(self.rows, w.size)[w.rank], chunk_rows=self.chunk_rows):
            X = X.astype(np.float64)
            total += X.sum(0)
            total_sq += (X**2).sum(0)
        if w.enabled:
            sums = [torch.from_numpy(total), torch.from_numpy(total_sq)]  # views: summed over the ranks in place
            w.all_reduce_(sums)
        mean = total / self.n_rows
        return mean, np.sqrt(np.maximum(total_sq / self.n_rows - mean**2, 0))


@dataclass
class FitResult:
    head_path: str
    kind: str
    cache: str
    metrics: dict[str, Any]
    seconds: float
    n_train: int
    n_val: int
    n_test: int
    reports: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _check_training_classes(cache: Path, table: RowTable, split: np.ndarray, rule: SplitRule) -> None:
    """Refuse a split whose training rows hold one class; warn about classes that only val/test
    rows hold (no head can predict them: their rows score as mistakes).

    Raises:
        UsageError: the training rows hold one class (e.g. one image per class, and the split
        sent a class's only image to val): nothing can be fitted.
    """
    labels, classes = table.labels, table.classes
    seen = np.unique(labels[split == "train"])
    if not len(seen):
        return  # no training rows at all: the fit says so
    unseen = [classes[int(c)] for c in np.setdiff1d(np.unique(labels[labels >= 0]), seen)]
    if len(seen) < 2:
        only, others = repr(classes[int(seen[0])]), ", ".join(map(repr, unseen[:5])) + (" …" if len(unseen) > 5 else "")
        fix = (f"put images of {others} in train/" if rule.kind == "folders" else
               f"the split (--val-fraction {rule.val_fraction:g}) sent every row of {others} to val: add images to those classes, or "
               "fit on every row with --val-fraction 0")
        raise UsageError(f"cache {str(cache)!r}: the training rows hold only class {only}; a head needs training rows of at least 2 classes: {fix}")
    if unseen:
        logger.warning(f"fit-head: class(es) {', '.join(map(repr, unseen[:10]))} have no training rows under this split: the head cannot predict "
                       "them, and their val/test rows count as mistakes")


def _load_split(cache: Path, val_fraction: float, seed: int):
    table = read_rows(cache)
    classes = table.classes
    labelled = int((table.labels >= 0).sum())
    if labelled == 0:
        raise UsageError(f"cache {str(cache)!r} has no labelled rows (it was extracted from an unlabeled folder); heads need class sub-folders")
    present = np.unique(table.labels[table.labels >= 0])
    if len(present) < 2:
        raise UsageError(f"cache {str(cache)!r} has only one class ({classes[int(present[0])]!r}); a classifier needs at least 2 class folders")
    split, rule = assign_splits(table.paths, table.labels, table.split, val_fraction, seed)
    _check_training_classes(cache, table, split, rule)
    return table, split, rule


def read_embeddings(table: RowTable, rows: np.ndarray, dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """Embeddings of ``rows`` (ids of ``table``'s version) as float32, read in storage order;
    into ``out`` (float32, at least that many rows) when given: a stream reuses one buffer (a
    fresh one per chunk costs its page faults again, as much as the read on a VM)."""
    rows = np.asarray(rows, dtype=np.int64)
    X = np.empty((len(rows), dim), dtype=np.float32) if out is None else out[: len(rows)]
    sorted_reader = getattr(table.snapshot, "read_sorted_into", None)  # schema-2 caches
    if sorted_reader is not None and np.all(rows[1:] > rows[:-1]) and table.meta.get("dtype", "float32") == "float32":  # a chunk in storage order
        sorted_reader(X, rows)
        return X
    order = np.argsort(rows)
    for pos, block in iter_embeddings(table, rows[order], chunk_rows=1 << 16):
        X[order[pos]] = block
    return X


def _stream_chunk_rows(budget: int, dim: int, n_classes: int) -> int:
    """Rows of a streamed chunk: ``chunk_bytes`` of them with their working copies and their
    [rows, classes] scores, softmax and gradient (at 128 dims and 100 classes those are most
    of it), at least 1,024."""
    return max(1024, chunk_bytes(budget) // (dim * 4 * IN_MEMORY_COPIES + n_classes * 4 * SCORE_COPIES))


def _metrics_in_chunks(head, table: RowTable, rows: np.ndarray, dim: int, classes: list[str], chunk_rows: int) -> dict[str, Any]:
    """``classification_metrics`` of ``head`` on ``rows``, read and scored ``chunk_rows`` at a time in storage order."""
    rows = rows[np.argsort(table.index_rows[rows], kind="stable")]
    running = RunningMetrics(list(classes))
    buffer = np.empty((min(chunk_rows, len(rows)), dim), dtype=np.float32)
    for c in range(0, len(rows), chunk_rows):
        r = rows[c : c + chunk_rows]
        running.add(table.labels[r], full_proba(head, read_embeddings(table, table.index_rows[r], dim, buffer), len(classes)))
    return running.result()


def full_proba(head, X: np.ndarray, n_classes: int) -> np.ndarray:
    """[N, n_classes] probabilities even when the head saw only some classes."""
    proba = head.predict_proba(X)
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(head.classes_, dtype=int)] = proba
    return out


def _default_head_path(cache: Path, kind: str) -> Path:
    return Path(os.environ.get("FEATCACHE_HEAD_DIR", "heads")) / f"{cache.stem}.{kind}.head.pt"


def fit_head(cache: str | os.PathLike, options: FitOptions | str | Mapping[str, Any] | None = None, out: str | os.PathLike | None = None, *,
             plots: bool = True, wait: float = 0.0, extra_provenance: dict[str, Any] | None = None, title: str | None = None, **fields: Any) -> FitResult:
    """Fit the head ``options`` names on the cache's train rows, score val/test, save the
    artifact and reports. ``options`` may be just the head's name (``"logreg"``); ``fields``
    replace single values (``C=0.5``).

    The head file is locked while it is written (``wait`` seconds for another writer).
    ``extra_provenance`` is recorded with the head (``run`` stores its spec digest there).
    ``title`` names the head in its plots (a job's ``mlp-wide``); the default is its kind.

    Raises:
        CacheError, UsageError (bad options, one class, no labels, logreg on a cache too big
        for RAM), LockHeldError, StorageError.
    """
    opts = build(FitOptions, {"clf": options} if isinstance(options, str) else options, **fields)
    cache = Path(cache)
    out_path = Path(out) if out is not None else _default_head_path(cache, opts.clf)
    loaded = _load_split(cache, opts.val_fraction, opts.seed)  # a bad cache is refused before anything is created
    w = world("cpu") if launched_by_torchrun() else World()
    if w.enabled and (opts.clf not in DISTRIBUTED_HEADS or opts.is_grid()):
        what = "a grid of heads" if opts.is_grid() else f"--clf {opts.clf}"
        raise UsageError(f"fit-head under torchrun fits --clf {', '.join(DISTRIBUTED_HEADS)} (the rows split across the ranks); {what} runs in one "
                         "process: python cli.py fit-head ...")
    lock = WriterLock(out_path, command=f"fit-head --clf {opts.clf}", wait=wait) if w.is_main else contextlib.nullcontext()
    with lock:  # rank 0 writes the head: only it holds the lock
        return _fit_head_locked(cache, loaded, opts, out_path, plots, extra_provenance or {}, title, w)


def _plot_label(kind: str, title: str | None) -> str:
    """``mlp-wide (mlp)`` for a named head, just the kind otherwise."""
    return kind if not title or title == kind else f"{title} ({kind})"


def _fit_head_locked(cache: Path, loaded: tuple, opts: FitOptions, out_path: Path, plots: bool, extra_provenance: dict[str, Any],
                     title: str | None = None, w: World = World()) -> FitResult:
    kind = opts.clf
    table, split, rule = loaded
    dim = int(table.meta["embed_dim"])
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if not len(idx["train"]):
        raise UsageError(f"cache {str(cache)!r} has no training rows; add images or lower --val-fraction")
    known = np.isin(table.labels[idx["val"]], table.labels[idx["train"]])
    fit_idx = {**idx, "val": idx["val"][known]}  # the val rows a head can be scored on while it fits (early stopping, k, C)
    budget = working_budget(opts.memory_budget_bytes, table.nbytes)  # the table's paths, labels and hashes count against it
    need = len(table.index_rows) * dim * 4 * (IN_MEMORY_COPIES if kind == "logreg" else 1)
    streaming = opts.stream or need > budget or w.enabled
    if w.enabled:
        shared = ("loss and gradient summed over the ranks" if kind == "logreg" else
                  "each global batch split across the ranks, gradients summed (one process's batches and steps)")
        logger.info(f"fit-head --clf {kind}: {w.size} ranks, each streaming its {len(idx['train']) // w.size:,} of the training rows; {shared}")
    elif streaming and not opts.stream:
        say_streaming(f"fit-head --clf {kind}", need + table.nbytes, opts.memory_budget_bytes, f"streaming the cache in chunks of {human(chunk_bytes(budget))}")
    head = make_head(kind, **opts.estimator_params())
    t0 = time.perf_counter()
    if opts.select_on == "val" and not len(idx["val"]):
        raise UsageError(f"--select-on val: cache {str(cache)!r} has no validation rows under this split; use --select-on cv or a --val-fraction above 0")
    grid_board: list[dict[str, Any]] = []
    if streaming and kind == "logreg" and not opts.is_grid():  # the same fit, summed over chunks read from the cache
        tr = idx["train"]
        share = np.array_split(np.argsort(table.index_rows[tr], kind="stable"), w.size)[w.rank]  # storage order: a chunk is one read
        on_val = opts.select_on == "val" and known.any()
        Xv = read_embeddings(table, table.index_rows[fit_idx["val"]], dim) if on_val else None
        head.fit_rows(lambda pos, out=None: read_embeddings(table, table.index_rows[tr[pos]], dim, out), table.labels[tr], dim,
                      chunk_rows=_stream_chunk_rows(budget, dim, len(table.classes)),
                      X_val=Xv, y_val=table.labels[fit_idx["val"]] if on_val else None,
                      stream_order=share, keep_bytes=max(0, budget - 2 * chunk_bytes(budget)), world=w)
        X = {s: None for s in idx}
    elif opts.is_grid():
        head, grid_board = _fit_grid(cache, table, fit_idx, opts, head, streaming, dim)
        X = {s: None for s in idx}
    elif streaming and kind == "knn":  # the training rows stay in the cache
        tr = idx["train"]
        Xv = read_embeddings(table, table.index_rows[fit_idx["val"]], dim) if len(fit_idx["val"]) else None
        head.fit_cache(cache, [str(p) for p in table.paths[tr]], table.sha256_hex(tr), table.labels[tr], dim,
                       Xv, table.labels[fit_idx["val"]] if Xv is not None else None)
        X = {s: None for s in idx}
    elif streaming:
        src = lambda s: CacheSource(table, table.index_rows[fit_idx[s]], table.labels[fit_idx[s]])  # noqa: E731
        head.fit_source(src("train"), src("val") if len(fit_idx["val"]) else None, classes=np.unique(table.labels[idx["train"]]),
                        n_features=dim, train_labels=table.labels[idx["train"]], world=w)
        X = {s: None for s in idx}
    else:
        X = {s: read_embeddings(table, table.index_rows[idx[s]], dim) for s in idx}
        y_train = table.labels[idx["train"]]
        use_val = isinstance(head, (TorchHead, KNNHead)) or opts.select_on == "val"  # early stopping, k, or logreg's C on val
        if use_val and known.any():
            head.fit(X["train"], y_train, X["val"][known], table.labels[fit_idx["val"]])
        else:
            head.fit(X["train"], y_train)
    if w.is_main and getattr(head, "C_at_edge_", "") == "largest":  # (the smallest edge is a model of class frequencies: recorded, nothing beyond it)
        logger.warning(f"logreg: the chosen C={head.C_:g} is the largest value searched; a weaker regularisation may be better "
                       "(try --C with larger values)")
    seconds = time.perf_counter() - t0
    result = w.run_on_main(lambda: _score_and_save(cache, table, idx, X, head, opts, out_path, plots, extra_provenance, title, seconds, grid_board,
                                                   dim, budget, rule, w.size))
    return w.broadcast(result)


def _score_and_save(cache: Path, table, idx: dict[str, np.ndarray], X: dict[str, Any], head, opts: FitOptions, out_path: Path, plots: bool,
                    extra_provenance: dict[str, Any], title: str | None, seconds: float, grid_board: list, dim: int, budget: int, rule: SplitRule,
                    ranks: int) -> FitResult:
    """Metrics on val/test, the artifact with its provenance, the reports (rank 0's work under torchrun)."""
    kind, meta, classes = opts.clf, table.meta, table.classes
    metrics: dict[str, Any] = {}
    for s in ("val", "test"):
        if len(idx[s]) and X[s] is not None:
            metrics[s] = classification_metrics(table.labels[idx[s]], full_proba(head, X[s], len(classes)), classes)
        elif len(idx[s]):  # streamed: scored a chunk at a time (RunningMetrics equals classification_metrics)
            metrics[s] = _metrics_in_chunks(head, table, idx[s], dim, classes, _stream_chunk_rows(budget, dim, len(classes)))
    metrics["fit_seconds"] = seconds
    if grid_board:
        metrics["grid"] = grid_board
    if getattr(head, "path_", None):
        metrics["selection"] = {"C": head.C_, "select_on": opts.select_on, "at_edge": head.C_at_edge_ or None, "path": head.path_}
    history = list(getattr(head, "history_", []) or [])
    provenance = {
        **inherited(meta),
        "cache": str(cache.resolve()),
        "cache_schema_version": SCHEMA_VERSION,
        "cache_fingerprint": table.content_digest(),
        "split_rule": rule.to_dict(),
        **({"fit_path": "streamed" if getattr(head, "streamed_", False) else "in-memory"} if kind == "logreg" else {}),
        **({"ranks": ranks} if ranks > 1 else {}),
        "n_train": int(len(idx["train"])), "n_val": int(len(idx["val"])), "n_test": int(len(idx["test"])),
        **versions("sklearn"), "fitted_at": timestamp(),
        **extra_provenance,
    }
    extra = {"history": history, "C": getattr(head, "C_", None), "cv_path": getattr(head, "path_", []), "cv_scores": {str(k): v for k, v in (getattr(head, "cv_scores_", {}) or {}).items()}}
    ensure_free_space(out_path, payload_bytes(head.get_state()) + REPORTS_NEED)  # the head and its reports fit, or nothing is touched
    clear_reports(out_path)
    save_head(out_path, head, kind, head.get_params(), provenance, metrics, extra)
    label = _plot_label(kind, title)
    reports = write_reports(out_path, metrics, classes, history, label, plots, best_epoch=kept_epoch(history))
    if grid_board and plots:
        rows = [{"name": r["name"], "accuracy": r["val_accuracy"] or 0.0} for r in grid_board]
        chart = out_path.with_name(out_path.name.removesuffix(".pt") + ".grid.png")
        reports["grid_png"] = str(plot_leaderboard(rows, chart, f"{label}: {len(rows)} heads trained in one read (best first)"))
    return FitResult(str(out_path), kind, str(cache), metrics, seconds, len(idx["train"]), len(idx["val"]), len(idx["test"]), reports, head.get_params())


def _fit_grid(cache: Path, table, idx: dict[str, np.ndarray], opts: FitOptions, template: TorchHead, streaming: bool, dim: int):
    """Every (lr, weight decay, architecture) of ``opts`` trained on one read of the cache per
    epoch; the best on validation rows (or a held-out share of train when the split has none)."""
    from .grid import fit_grid, grid_members

    hiddens = opts.hidden if opts.clf == "mlp" and opts.hidden else (tuple(template.hidden),)
    members = grid_members(opts.lr or (template.lr,), opts.weight_decay or (template.weight_decay,), hiddens)
    train_rows, val_rows = idx["train"], idx["val"]
    if not len(val_rows):  # hold out a stratified share of train, as a single torch head does
        from sklearn.model_selection import train_test_split

        labels = table.labels[train_rows]
        strat = labels if np.bincount(labels).min() >= 2 else None
        train_rows, val_rows = train_test_split(train_rows, test_size=max(template.val_fraction, 0.1), random_state=opts.seed, stratify=strat)
    if streaming:
        source = lambda rows: CacheSource(table, table.index_rows[rows], table.labels[rows])  # noqa: E731
    else:
        source = lambda rows: ArraySource(read_embeddings(table, table.index_rows[rows], dim), table.labels[rows])  # noqa: E731
    train_labels = table.labels[train_rows]
    return fit_grid(template, members, source(train_rows), source(val_rows), np.unique(train_labels), dim, train_labels)


def compare_caches(caches: list[str | os.PathLike], options: FitOptions | str | list[FitOptions | str] | None = None,
                   out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit each head (``options``: one or several) on each cache and rank every pair by
    validation accuracy: which backbone transfers best, which head suits a cache. The heads and
    the chart go to ``out_dir`` (default ``heads/compare/``, or ``$FEATCACHE_HEAD_DIR/compare/``)."""
    heads = [build(FitOptions, {"clf": o} if isinstance(o, str) else o) for o in (options if isinstance(options, list) else [options])]
    if not caches:
        raise UsageError("compare needs at least one cache")
    if len({h.clf for h in heads}) != len(heads):
        raise UsageError("--clf names the same head twice; give each head once")
    out_dir = Path(out_dir) if out_dir is not None else Path(os.environ.get("FEATCACHE_HEAD_DIR", "heads")) / "compare"
    metas = {str(c): read_cache_meta(c) for c in caches}  # every cache is checked before any head is fitted
    rows = []
    for c in caches:
        meta = metas[str(c)]
        for opts in heads:
            r = fit_head(c, opts, out_dir / f"{Path(c).stem}.{opts.clf}.head.pt", plots=False)
            m = r.metrics.get("val") or r.metrics.get("test")
            name = f"{meta['model']}{' ' + meta['layer'] if meta.get('layer') else ''} ({meta['weights']})" + (f" · {opts.clf}" if len(heads) > 1 else "")
            rows.append({"name": name, "clf": opts.clf, "cache": str(c), "accuracy": m["accuracy"] if m else float("nan"),
                         "macro_f1": m["macro_f1"] if m else float("nan"), "fit_seconds": r.seconds, "embed_dim": meta["embed_dim"],
                         "head": r.head_path})
    rows.sort(key=lambda r: -r["accuracy"])
    kinds = "+".join(h.clf for h in heads)
    what = "backbone" if len(heads) == 1 else "backbone and head" if len(caches) > 1 else "head"
    w = world("cpu") if launched_by_torchrun() else World()
    chart = w.broadcast(w.run_on_main(lambda: plot_leaderboard(rows, out_dir / f"leaderboard.{kinds}.png", f"{kinds}: validation accuracy by {what}")))
    return {"clf": kinds, "leaderboard": rows, "chart_png": str(chart)}
