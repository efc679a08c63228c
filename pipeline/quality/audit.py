"""The data-quality audit of a cache: likely label errors, near-duplicates and split leaks,
class imbalance, files that failed. ``run_audit`` works on rows in memory (the report calls
it with the rows it already read); ``audit_cache`` reads a cache first.

Cost on 2 CPU cores (``bench/report.py``): a few seconds for the demo digits, well under a
minute for 50,000 x 2,048 (one covariance pass, K logreg fits on 128 components, one blocked
similarity pass on 128 components).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import AUDIT_CHECKS
from ..heads import assign_splits
from ..memory import budget_bytes, human, return_freed_memory, say_streaming, working_budget
from ..names import printable as _printable
from ..store import RowTable, read_rows
from .duplicates import Duplicates, chance_threshold, find_duplicates, identical_rows, with_split
from .label_errors import LabelIssues, find_label_issues
from .oof import OutOfFold, out_of_fold_proba
from .options import AuditOptions
from .precision import HARDEST_SHARE, MIN_PLANTED, POOR_PRECISION, PrecisionEstimate, estimate_precision
from .similarity import unit_rows
from .space import CHUNK_ROWS as SPACE_CHUNK_ROWS
from .space import MIN_ROWS, EmbeddingSpace, fit_space
from .spill import CacheRows, SpilledRows, rows_of

logger = logging.getLogger(__name__)

FOLD_ROWS_FLOOR = 100_000  # rows a fold of the out-of-fold logreg may always fit on (a cache this small fits exactly as in memory; 128 x 100 weights need no more)
FIT_BYTES_PER_VALUE = 16  # the fold's rows as read (float32) and standardised (float64), and its share of the solver (measured: 520 MB at 250,000 x 128)
FIT_SHARE = 2  # a fold's fit holds at most 1/FIT_SHARE of the budget (the rest: the per-row labels, splits and paths, which grow with N)
INDEX_SHARE = 2  # the near-duplicate index of rows on disk holds at most 1/INDEX_SHARE of the budget (``ann.approximate_pairs_above``)
INDEX_FLOOR = 256 << 20  # ... and at least this (smaller shards are searched by ever more rows: 10 shards at 10 M x 128)
PROBA_FLOAT64_FLOOR = 256 << 20  # out-of-fold probabilities stay float64 up to this size (beyond a quarter of the budget, float32)


@dataclass
class Audit:
    """Everything the checks found, with the rows they refer to (indices into ``paths``)."""

    options: AuditOptions
    paths: np.ndarray  # [N] str
    labels: np.ndarray  # [N] int, -1 unlabeled
    split: np.ndarray  # [N] "train" / "val" / "test" / ""
    classes: list[str]
    space: EmbeddingSpace | None
    unit: np.ndarray | None  # [N, k] unit rows in the whitened space (similarities)
    whitened: np.ndarray | None  # [N, k]
    oof: OutOfFold | None
    issues: LabelIssues | None  # over ``labelled`` rows
    labelled: np.ndarray  # [L] row indices of the labelled rows
    duplicates: Duplicates | None
    failures: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cache: str = ""
    label_errors_skipped: str = ""  # why there is no label-error list (``issues`` is None)
    estimate: PrecisionEstimate | None = None  # the detector measured on planted flips (``precision.py``); None: not measured

    @property
    def duplicate_threshold(self) -> float:
        """The near-duplicate threshold used: the option's, raised when the space has so few
        components that unrelated rows would often pass it (``chance_threshold``)."""
        if self.space is None:
            return self.options.duplicate_threshold
        return max(self.options.duplicate_threshold, chance_threshold(self.space.dims, len(self.paths)))

    def judged_by(self, split: np.ndarray) -> Audit:
        """The same findings with the split (and so the leaks) of another rule: a head's own."""
        split = np.asarray(split, dtype=object)
        return replace(self, split=split, duplicates=with_split(self.duplicates, split, self.unit) if self.duplicates is not None else None)

    # -- what the checks found, row by row
    @property
    def label_errors_reliable(self) -> bool:
        """Whether the list is reported as label errors: the detector's precision, estimated on
        planted flips, reaches ``POOR_PRECISION`` (or could not be estimated: too few rows)."""
        return self.issues is not None and (self.estimate is None or self.estimate.reliable)

    def _flagged_rows(self) -> np.ndarray:
        """The rows confident learning flags at the operating point (``precision.py``), lowest self-confidence first."""
        if self.issues is None:
            return np.zeros(0, dtype=np.int64)
        ranked = self.issues.ranked
        if self.estimate is not None and self.estimate.threshold < 1.0:
            ranked = ranked[self.issues.self_confidence[ranked] <= self.estimate.threshold]
        return self.labelled[ranked]

    def label_error_rows(self) -> np.ndarray:
        """Rows (indices into ``paths``) of the likely label errors, lowest self-confidence first;
        none when the detector is not reliable on this data (``hardest_rows`` then)."""
        return self._flagged_rows() if self.label_errors_reliable else np.zeros(0, dtype=np.int64)

    def hardest_rows(self) -> np.ndarray:
        """When the detector is not reliable here: the flagged rows with the lowest probability of
        their given label, at most ``HARDEST_SHARE`` of the labelled rows (at least ``MIN_PLANTED``);
        examples to look at, not label errors. Empty otherwise."""
        if self.label_errors_reliable or self.issues is None:
            return np.zeros(0, dtype=np.int64)
        return self._flagged_rows()[: max(MIN_PLANTED, int(HARDEST_SHARE * len(self.labelled)))]

    def duplicate_order(self) -> np.ndarray:
        """Pair indices with the leaks (pairs across splits) first, each group in its kept order (exact, then most similar)."""
        return np.argsort(~self.duplicates.leak, kind="stable") if self.duplicates is not None else np.zeros(0, dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def imbalance(self) -> dict[str, Any]:
        """Largest / smallest class, and the classes under largest / ``imbalance_ratio`` (empty classes included)."""
        counts = self.class_counts()
        if not counts or not any(counts.values()):
            return {"ratio": None, "largest": None, "smallest": None, "minority_classes": []}
        largest = max(counts, key=counts.get)
        smallest = min(counts, key=counts.get)
        ratio = counts[largest] / counts[smallest] if counts[smallest] else float("inf")
        limit = counts[largest] / self.options.imbalance_ratio
        minority = [c for c, n in sorted(counts.items(), key=lambda kv: kv[1]) if n < limit]
        return {"ratio": ratio, "largest": largest, "smallest": smallest, "minority_classes": minority}

    def counts(self) -> dict[str, int]:
        """One number per check ``--fail-on`` can name (and what a job's run.json records)."""
        dup = self.duplicates.counts(self.split) if self.duplicates is not None else {"pairs": 0, "leaks": 0}
        return {"label-errors": len(self.label_error_rows()), "duplicates": dup["pairs"], "leaks": dup["leaks"],
                "imbalance": len(self.imbalance()["minority_classes"]), "failed-files": len(self.failures)}

    def failing(self, fail_on: tuple[str, ...]) -> list[str]:
        """The checks of ``fail_on`` that found something, as "leaks (4)"."""
        counts = self.counts()
        return [f"{name} ({counts[name]})" for name in fail_on if counts.get(name, 0) > 0]

    def to_dict(self, limit: int = 1000) -> dict[str, Any]:
        """JSON for ``audit --json``: counts, then at most ``limit`` entries per list."""
        out: dict[str, Any] = {"cache": self.cache, "rows": int(len(self.paths)), "labelled": int(len(self.labelled)), "counts": self.counts(),
                               "class_counts": self.class_counts(), "imbalance": self.imbalance(), "notes": self.notes,
                               "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if self.space is not None:
            out["space"] = {"components": self.space.dims, "explained_variance": round(self.space.explained, 4)}
            out["duplicate_threshold"] = round(self.duplicate_threshold, 6)
        if self.oof is not None:
            out["label_errors_method"] = {"method": f"confident learning, cleanlab find_label_issues(filter_by={self.options.label_method!r})",
                                          "folds": self.oof.folds, "C": self.oof.C, "out_of_fold_accuracy": round(self.oof.accuracy, 4),
                                          "chance_accuracy": round(self.oof.chance, 4), "p_value_vs_chance": float(f"{self.oof.p_value:.3g}")}
        out["label_errors_assessed"] = self.issues is not None
        out["label_errors_reliable"] = self.label_errors_reliable
        if self.estimate is not None:
            out["label_errors_estimate"] = self.estimate.to_dict()
        out["near_duplicates_assessed"] = self.space is not None  # exact copies are listed either way
        if self.label_errors_skipped:
            out["label_errors_skipped"] = self.label_errors_skipped
        out["label_errors"] = [self.label_error(r) for r in self.label_error_rows()[:limit]]
        out["hardest_examples"] = [self.label_error(r) for r in self.hardest_rows()[:limit]]
        out["duplicates"] = [self.duplicate(int(p)) for p in self.duplicate_order()[:limit]]  # leaks first
        out["failed_files"] = [{"path": p, "reason": r} for p, r in self.failures[:limit]]
        return out

    def label_error(self, row: int) -> dict[str, Any]:
        pos = int(np.searchsorted(self.labelled, row))
        return {"row": int(row), "path": str(self.paths[row]), "split": str(self.split[row]), "given": self.classes[int(self.labels[row])],
                "suggested": self.classes[int(self.issues.suggested[pos])], "given_probability": round(float(self.issues.self_confidence[pos]), 4),
                "suggested_probability": round(float(self.oof.proba[pos].max()), 4)}

    def duplicate(self, p: int) -> dict[str, Any]:
        d = self.duplicates
        i, j = int(d.pairs.i[p]), int(d.pairs.j[p])
        name = lambda r: self.classes[int(self.labels[r])] if self.labels[r] >= 0 else ""
        return {"a": str(self.paths[i]), "b": str(self.paths[j]), "split_a": str(self.split[i]), "split_b": str(self.split[j]),
                "class_a": name(i), "class_b": name(j), "similarity": round(float(d.pairs.similarity[p]), 4), "exact": bool(d.exact[p]),
                "leak": bool(d.leak[p])}


@dataclass
class Projected:
    """Rows in the audit's space: what every check needs, without the embeddings themselves
    (callers drop those before the checks run, to keep the peak memory at one copy)."""

    space: EmbeddingSpace | None
    whitened: np.ndarray | SpilledRows | None  # [N, k]
    seconds: float = 0.0
    identical: np.ndarray | None = None  # [N] first row of each row's byte-identical embedding, -1 (``identical_rows``)
    no_space: str = ""  # why ``space`` is None
    unit: SpilledRows | None = None  # [N, k] unit rows, when spilled beside ``whitened`` (else made from it)
    budget: int | None = None  # --memory-budget in bytes, when the rows are on disk (bounds the label-error fits)


def project_rows(X: np.ndarray, dims: int) -> Projected:
    """The whitened principal-component space of ``X`` and the rows in it (None below
    ``MIN_ROWS`` or when the rows do not vary), and which rows are byte-identical."""
    return project(X, dims)


def project(X: np.ndarray | CacheRows, dims: int, budget: int | None = None, beside: Path | None = None,
            order: np.ndarray | None = None) -> Projected:
    """``project_rows`` for rows in memory, or read on demand from a cache over the memory
    budget (``CacheRows``): then the space comes from the same streamed passes (the same sums,
    chunk by chunk: the same space) and every row is projected a chunk at a time into float32
    spills ``beside`` the cache (whitened and unit rows; ``spill.py``), so memory is a chunk
    of embeddings and the D x D covariance, whatever N. ``order``: the order the passes visit
    the rows in (``cache_rows``' storage order: rows on disk read in runs; the same order in
    memory gives the same sums, so the same space); the results stay in the rows' own order."""
    t = time.perf_counter()
    n = len(X)
    identical = identical_rows(X, order=order)
    if n < MIN_ROWS:
        return Projected(None, None, identical=identical, no_space=f"{n} row(s): too few for label errors, near-duplicates or a map")
    space = fit_space(X, dims, order)
    if space.dims == 0:
        return Projected(None, None, time.perf_counter() - t, identical,
                         f"every one of the {n:,} embeddings is the same vector (no variance): label errors, near-duplicates "
                         "beyond exact copies and the map cannot be assessed")
    in_memory = isinstance(X, np.ndarray)
    if in_memory:
        whitened, unit, spilled = np.empty((n, space.dims), dtype=np.float32), None, ""
    else:
        whitened, unit = SpilledRows(n, space.dims, beside, "whitened"), SpilledRows(n, space.dims, beside, "unit")
        spilled = f", {n:,} rows projected and spilled to {whitened.folder} ({human(2 * whitened.nbytes)}, removed at exit)"
    order = np.arange(n) if order is None else order
    for a in range(0, n, SPACE_CHUNK_ROWS):  # the chunks of ``EmbeddingSpace.project``, in ``order``: the same rows in memory and on disk
        rows = order[a : a + SPACE_CHUNK_ROWS]
        block = space.project(X[rows])
        if in_memory:
            whitened[rows] = block
        else:
            whitened.write_at(rows, block)
            unit.write_at(rows, unit_rows(block))
    seconds = time.perf_counter() - t
    logger.info(f"audit: {space.dims} principal components ({100 * space.explained:.1f} % of the variance){spilled} in {seconds:.1f}s")
    return Projected(space, whitened, seconds, identical, unit=unit, budget=None if in_memory else budget)


def _label_error_limits(rows: Projected, n_labelled: int, n_classes: int) -> dict[str, Any]:
    """``out_of_fold_proba``'s limits for rows on disk: each fold's training sample, and the
    result's dtype and place from the budget (with floors: a small cache fits exactly as in
    memory): float64 up to a quarter of the budget, then float32, then float32 spilled beside
    the projected rows (10 M rows x 100 classes: 4 GB)."""
    if rows.budget is None:
        return {}
    dims = rows.space.dims
    fit_rows = max(FOLD_ROWS_FLOOR, rows.budget // FIT_SHARE // (dims * FIT_BYTES_PER_VALUE))
    room = max(rows.budget // 4, PROBA_FLOAT64_FLOOR)
    wide = n_labelled * n_classes * 8 <= room
    spill = n_labelled * n_classes * 4 > room and isinstance(rows.whitened, SpilledRows)
    return {"max_train_rows": int(fit_rows), "dtype": np.float64 if wide else np.float32,
            "spill_beside": rows.whitened.beside if spill else None}


def run_audit(X: np.ndarray, labels: np.ndarray, split: np.ndarray, paths: np.ndarray, classes: list[str], options: AuditOptions | None = None, *,
              sha256: np.ndarray | None = None, failures: list[tuple[str, str]] | None = None) -> Audit:
    """Every check on rows in memory: ``X`` [N, D] embeddings, ``labels`` [N] (-1 unlabeled),
    ``split`` [N] names, ``sha256`` [N, 32] file hashes (exact duplicates), ``failures`` (path, reason)."""
    opts = options or AuditOptions()
    return audit_projected(project_rows(X, opts.dims), labels, split, paths, classes, opts, sha256=sha256, failures=failures)


def audit_projected(rows: Projected, labels: np.ndarray, split: np.ndarray, paths: np.ndarray, classes: list[str], options: AuditOptions | None = None,
                    *, sha256: np.ndarray | None = None, failures: list[tuple[str, str]] | None = None) -> Audit:
    """``run_audit`` on rows already projected (``project_rows``)."""
    opts = options or AuditOptions()
    labels = np.asarray(labels, dtype=np.int64)
    split = np.asarray(split, dtype=object)
    labelled = np.flatnonzero(labels >= 0)
    audit = Audit(opts, np.asarray(paths), labels, split, list(classes), None, None, None, None, None, labelled, None, list(failures or []))
    if rows.space is None:
        audit.duplicates = find_duplicates(None, opts.duplicate_threshold, split, sha256, identical=rows.identical, max_pairs=opts.max_pairs)
        audit.notes.append(f"{rows.no_space or f'{len(labels)} row(s): no space'}; exact copies (same file or same embedding) are still listed")
        audit.label_errors_skipped = (f"label errors need at least {MIN_ROWS} rows (there are {len(labels)}); not assessed" if len(labels) < MIN_ROWS
                                      else "label errors not assessed: the embeddings do not vary, so nothing in them tells the classes apart")
        return audit
    audit.space, audit.whitened = rows.space, rows.whitened
    audit.unit = rows.unit if rows.unit is not None else unit_rows(rows.whitened)
    audit.seconds["space"] = rows.seconds

    t = time.perf_counter()
    threshold = audit.duplicate_threshold
    if threshold > opts.duplicate_threshold:
        audit.notes.append(f"near-duplicate threshold raised from {opts.duplicate_threshold:g} to {threshold:.4g}: {len(labels):,} rows give only "
                           f"{audit.space.dims} components, and in so few dimensions unrelated images often reach {opts.duplicate_threshold:g}")
    audit.duplicates = find_duplicates(audit.unit, threshold, split, sha256, identical=rows.identical, max_pairs=opts.max_pairs, device=opts.device,
                                       search=opts.near_duplicates, seed=opts.seed,
                                       index_bytes=max(INDEX_FLOOR, rows.budget // INDEX_SHARE) if rows.budget is not None else None)
    audit.seconds["duplicates"] = time.perf_counter() - t
    searched = audit.duplicates.search.note()
    if searched:
        audit.notes.append(searched)
        logger.info(f"audit: {searched}")
    if audit.duplicates.pairs.truncated:
        audit.notes.append(f"{audit.duplicates.pairs.found:,} near-duplicate pairs found; the {opts.max_pairs:,} kept are the exact copies, then the "
                           "most similar (--max-pairs)")
    logger.info(f"audit: {len(audit.duplicates)} near-duplicate pair(s) ({int(audit.duplicates.exact.sum())} exact) at cosine >= {threshold:.4g} "
                f"in {audit.seconds['duplicates']:.1f}s")

    t = time.perf_counter()
    present = np.unique(labels[labelled])
    if len(present) < 2:
        audit.label_errors_skipped = "label errors need labelled rows of at least 2 classes; not assessed"
    elif np.bincount(labels[labelled]).max() < 2:
        audit.label_errors_skipped = "label errors need a class with at least 2 labelled rows (out-of-fold probabilities need folds); not assessed"
    else:
        Z = rows_of(audit.whitened, labelled)
        limits = _label_error_limits(rows, len(labelled), len(classes))
        audit.oof = out_of_fold_proba(Z, labels[labelled], len(classes), opts.folds, opts.seed, **limits)
        if audit.oof.informative:
            audit.issues = find_label_issues(labels[labelled], audit.oof.proba, opts.label_method)
            audit.estimate = estimate_precision(Z, labels[labelled], len(classes), audit.issues.mask, audit.oof.folds,
                                                opts.seed, audit.oof.C, opts.label_method, **limits)
            audit.seconds["label_errors"] = time.perf_counter() - t
            e = audit.estimate
            measured = (f"; on {e.planted} planted flips: precision {e.precision:.2f}, recall {e.recall:.2f}" if e is not None
                        else "; precision not estimated (too few rows to plant flips)")
            if audit.label_errors_reliable:
                logger.info(f"audit: {len(audit.label_error_rows())} likely label error(s) ({audit.oof.folds}-fold out-of-fold logreg, C={audit.oof.C:g}, "
                            f"accuracy {audit.oof.accuracy:.4f}{measured}) in {audit.seconds['label_errors']:.1f}s")
            else:
                logger.info(f"audit: label errors not reported: the detector is not reliable on this data (precision {e.precision_at_cleanlab:.2f} on "
                            f"{e.planted} planted flips, under {POOR_PRECISION:g}); {len(audit.hardest_rows())} hardest examples listed instead, "
                            f"in {audit.seconds['label_errors']:.1f}s")
        else:
            audit.seconds["label_errors"] = time.perf_counter() - t
            audit.label_errors_skipped = (
                f"label errors not assessed: the out-of-fold logreg's accuracy {audit.oof.accuracy:.3f} is no better than always answering "
                f"the largest class ({audit.oof.chance:.3f}; binomial p = {audit.oof.p_value:.2g}), so the embeddings do not separate these "
                "classes and any suspects would be noise; a pretrained or stronger backbone (--model, --weights) gives the check something to go on")
    if audit.label_errors_skipped:
        logger.info(f"audit: {audit.label_errors_skipped}")
    return audit


def in_memory_bytes(n: int, dim: int, itemsize: int, dims: int) -> int:
    """What ``run_audit`` holds for ``n`` rows: the embeddings, then the whitened and unit rows."""
    k = min(dim, dims) if dims > 0 else dim
    return n * (dim * itemsize + 2 * k * 4)


def cache_rows(table: RowTable, options: AuditOptions, command: str) -> tuple[np.ndarray | CacheRows, int, np.ndarray]:
    """The cache's embeddings (in its table's order), the budget in bytes and the rows' storage
    order (``project``'s passes visit them in it, in memory as on disk: the same space): in
    memory when they and the audit's working rows fit ``options.memory_budget``, else read on
    demand (``spill.CacheRows``), which ``project`` then audits from disk; ``command`` says so."""
    X = CacheRows(table)
    stated = budget_bytes(options.memory_budget)
    budget = working_budget(stated, table.nbytes)  # the table's paths, labels and hashes count against it
    need = in_memory_bytes(len(X), X.shape[1], X.dtype.itemsize, options.dims)
    if need <= budget:
        return X[:], budget, X.storage_order()
    say_streaming(command, need + table.nbytes, stated, "reading the embeddings a chunk at a time and spilling the projected rows to disk")
    return X, budget, X.storage_order()


def audit_cache(cache: str | os.PathLike, options: AuditOptions | None = None) -> Audit:
    """``run_audit`` on a cache's rows; the split is the cache's own (pre-split data) or
    fit-head's hash rule with the options' ``val_fraction`` and ``seed``. A cache whose rows
    need more than ``options.memory_budget`` is audited from disk (``project``): the
    same space, checks and findings, the embeddings read a chunk at a time.

    Raises:
        UsageError, CacheError, DamagedCacheError (as ``load_cache``), StorageError (no room
        beside the cache, nor in the temporary folder, for the projected rows).
    """
    opts = options or AuditOptions()
    t0 = time.perf_counter()
    with read_rows(cache) as table:
        split, _ = assign_splits(table.paths, table.labels, table.split, opts.val_fraction, opts.seed)
        failures = sorted((p, r) for p, r, _, _ in table.snapshot.failure_columns().items())
        X, budget, order = cache_rows(table, opts, "audit")
        read_s = time.perf_counter() - t0 if isinstance(X, np.ndarray) else 0.0
        rows = project(X, opts.dims, budget, Path(cache), order)
        del X  # the checks need only the projected rows: one copy of the embeddings at the peak, not two
        return_freed_memory()
        audit = audit_projected(rows, table.labels, split, table.paths, table.classes, opts, sha256=table.fingerprints.get("sha256"),
                                failures=failures)
    audit.cache = str(Path(cache))
    audit.seconds = {"read": read_s, **audit.seconds, "total": time.perf_counter() - t0}
    return audit


__all__ = ["AUDIT_CHECKS", "Audit", "audit_cache", "run_audit"]


def format_audit(audit: Audit, todo: list[str], limit: int = 20) -> str:
    """The audit for a terminal: counts, the first ``limit`` entries of each check, what to do."""
    c = audit.counts()
    lines = [f"cache      {audit.cache}", f"rows       {len(audit.paths):,} ({len(audit.labelled):,} labelled, {len(audit.classes)} classes)"]
    if audit.issues is None:
        lines.append(f"label errors  {audit.label_errors_skipped.removeprefix('label errors ')}")
    else:
        est = audit.estimate
        method = f"{audit.oof.folds}-fold out-of-fold logreg, accuracy {audit.oof.accuracy:.4f}; cleanlab {audit.options.label_method}"
        if est is None:
            measured = "precision not estimated: too few rows to plant flips"
        else:
            cut = f" at p(given) <= {est.threshold:.3g}" if est.threshold < 1.0 else ""
            measured = f"estimated on {est.planted} planted flips{cut}: precision {est.precision:.2f}, recall {est.recall:.2f}"
        if audit.label_errors_reliable:
            lines.append(f"label errors  {c['label-errors']}  ({method}; {measured})")
            shown = audit.label_error_rows()
        else:
            shown = audit.hardest_rows()
            lines.append(f"label errors  none reported: the detector is not reliable on this data (estimated precision {est.precision_at_cleanlab:.2f}, "
                         f"recall {est.recall_at_cleanlab:.2f} on {est.planted} planted flips, under {POOR_PRECISION:g}; {method})")
            lines.append(f"hardest examples  {len(shown)}  (lowest probability of the given label: look at them; more likely the model's mistakes "
                         "than wrong labels)")
        lines += [f"  {_printable(e['path'])}: given {_printable(e['given'])}, suggested {_printable(e['suggested'])} (p(given) {e['given_probability']:.2f})"
                  for e in (audit.label_error(r) for r in shown[:limit])]
    dup = audit.duplicates.counts(audit.split) if audit.duplicates is not None else {"pairs": 0, "leaks": 0}
    found = f"at cosine >= {audit.duplicate_threshold:.4g} or exact" if audit.space is not None else "of exact copies (no near-duplicate search: see the note)"
    lines.append(f"duplicates    {dup['pairs']} pair(s) {found}, {dup['leaks']} leak(s) across splits")
    for p in audit.duplicate_order()[:limit]:  # leaks first
        e = audit.duplicate(int(p))
        lines.append(f"  {_printable(e['a'])} ({e['split_a'] or '-'}) ~ {_printable(e['b'])} ({e['split_b'] or '-'}): {e['similarity']:.4f}"
                     + (" exact" if e["exact"] else "") + (" LEAK" if e["leak"] else ""))
    imb = audit.imbalance()
    ratio = "-" if imb["ratio"] is None else ("inf" if imb["ratio"] == float("inf") else f"{imb['ratio']:.1f}")
    lines.append(f"imbalance     largest/smallest class {ratio}; {c['imbalance']} class(es) under 1/{audit.options.imbalance_ratio:g} of the largest"
                 + (f": {', '.join(_printable(m) for m in imb['minority_classes'][:10])}" if imb["minority_classes"] else ""))
    lines.append(f"failed files  {c['failed-files']}")
    lines += [f"  {_printable(p)}: {_printable(r)}" for p, r in audit.failures[:limit]]
    lines += [f"note          {_printable(n)}" for n in audit.notes]
    lines.append("what to do")
    lines += [f"  - {_printable(t)}" for t in todo]  # advice quotes class names
    return "\n".join(lines)
