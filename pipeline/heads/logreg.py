"""``LogRegHead``: standardise, then L2 logistic regression with C chosen by a fast path.

The model is scikit-learn's own (a ``StandardScaler`` + ``LogisticRegression`` pipeline
holding the solution), so prediction, artifacts and stage 3 see exactly what they did;
only the solving is ours (``logreg_path``): torch L-BFGS, warm starts along C,
coarse-to-fine, folds on a subsample of a large training set, one refit on all rows.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from ..distributed import World
from .common import check_fitted, head_device
from .logreg_path import DEFAULT_CS, ChunkedLogisticProblem, LogisticProblem, balanced_weights, select_C, stratified_subsample

FLOAT64_MAX_VALUES = 20_000_000  # rows x features solved in float64 (exact); larger problems in float32


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """``n_jobs`` as torch's thread count for the duration of a fit (None: torch's default)."""
    before = torch.get_num_threads()
    if n is not None and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def combine_scalers(scaler: StandardScaler, parts: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
    """Set ``scaler`` to the statistics of the union of the rows behind ``parts`` ((count, mean,
    variance) per rank, in rank order: Chan, Golub & LeVeque's pairwise combination)."""
    counts = np.array([int(np.max(c)) for c, _, _ in parts], dtype=np.float64)  # n_samples_seen_: a number, or one per feature
    means = np.stack([m for _, m, _ in parts])
    variances = np.stack([v for _, _, v in parts])
    n = counts.sum()
    mean = (counts[:, None] * means).sum(0) / n
    var = (counts[:, None] * (variances + (means - mean) ** 2)).sum(0) / n
    scaler.mean_, scaler.var_, scaler.n_samples_seen_ = mean, var, int(n)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # scikit-learn's _is_constant_feature: such features keep scale 1
    scaler.scale_ = np.where(constant, 1.0, np.sqrt(var))


class LogRegHead(ClassifierMixin, BaseEstimator):
    """Standardise, then multinomial (binary for two classes) L2 logistic regression.

    ``C=None`` chooses C by stratified ``cv``-fold cross-validation on the training rows
    (at most ``select_rows`` of them, stratified), or on ``X_val``/``y_val`` when ``fit``
    is given them: over ``Cs`` (solved to ``tol``), or by default the decades 1e-6 … 1e4
    walked with warm starts to ``path_tol`` (the path only ranks C), stopped two decades
    past the best, then refined to quarter decades. A number fixes C. The chosen C is refit
    on every training row to ``tol`` (``tol / 100`` in float64). ``n_jobs`` is the solver's
    thread count; ``device`` ``auto`` uses the GPU when there is one.
    """

    def __init__(self, C: float | None = None, Cs: tuple[float, ...] | None = None, cv: int = 3, max_iter: int = 1000, tol: float = 1e-4,
                 class_weight: str | None = None, n_jobs: int | None = None, random_state: int = 0, select_rows: int = 10_000,
                 path_tol: float = 1e-3, device: str = "auto"):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.select_rows = select_rows
        self.path_tol = path_tol
        self.device = device

    # -- fitting
    def fit(self, X, y, X_val=None, y_val=None) -> LogRegHead:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        labels = self._start(y)
        scaler = StandardScaler().fit(X)
        dtype, as_tensor = self._tensors(X.size)
        t0 = time.perf_counter()
        with _threads(self.n_jobs):
            Z = as_tensor(scaler.transform(X))
            weights = lambda rows: self._row_weights(labels[rows], len(self.classes_), as_tensor)  # noqa: E731
            problem = LogisticProblem(Z, as_tensor(labels, torch.long), len(self.classes_), weights(np.arange(len(labels))))
            W, b, n_iter = self._solve(problem, lambda rows: Z[torch.as_tensor(rows, device=Z.device)], labels, weights, X_val, y_val, scaler,
                                       as_tensor, dtype)
        return self._finish(scaler, W, b, n_iter, t0, streamed=False)

    def fit_rows(self, read: Callable[..., np.ndarray], y, n_features: int, chunk_rows: int, X_val=None, y_val=None,
                 stream_order: np.ndarray | None = None, keep_bytes: int = 0, world: World | None = None) -> LogRegHead:
        """:meth:`fit` on rows read ``chunk_rows`` at a time (``read(positions, out)``: float32 rows
        of ``n_features``, positions into ``y``, into the buffer ``out`` when it is not None and
        returned): the same standardisation (accumulated chunk by
        chunk), the same C selection (its subsample read once) and the same objective, summed
        over chunks, so memory is one chunk plus the model however many rows there are.
        ``stream_order``: the positions in the order to read them (a cache's storage order,
        where a chunk is one contiguous read; the sums do not depend on it). ``keep_bytes``:
        standardised chunks held in memory up to this size, so each pass of the solver reads
        only the rest (the budget spent where it saves the most: re-reading every pass).
        ``world`` (torchrun): ``stream_order`` is this rank's share of the rows, ``y`` every
        row's label; the standardisation, the loss and its gradient are summed over the ranks,
        C is rank 0's, so every rank ends with the one-process model."""
        y = np.asarray(y)
        labels = self._start(y)
        self.n_features_in_ = int(n_features)
        n = len(labels)
        order = np.arange(n) if stream_order is None else np.asarray(stream_order, dtype=np.int64)
        chunk_rows = max(1, int(chunk_rows))
        starts = range(0, len(order), chunk_rows)
        buffer = np.empty((max(1, min(chunk_rows, len(order))), self.n_features_in_), dtype=np.float32)  # one for every chunk of every pass
        scaler = StandardScaler()
        for a in starts:
            scaler.partial_fit(read(order[a : a + chunk_rows], buffer))
        distributed = world is not None and world.enabled
        if distributed:
            zeros = np.zeros(self.n_features_in_)
            mine = (getattr(scaler, "n_samples_seen_", 0), getattr(scaler, "mean_", zeros), getattr(scaler, "var_", zeros))  # a rank may have no rows
            combine_scalers(scaler, world.gather(mine))
        dtype, as_tensor = self._tensors(n * self.n_features_in_)
        weights = lambda rows: self._row_weights(labels[rows], len(self.classes_), as_tensor)  # noqa: E731
        every = self._row_weights(labels, len(self.classes_), np.asarray)  # from all the labels ("balanced" counts every class), sliced per chunk

        mean, scale = as_tensor(scaler.mean_), as_tensor(scaler.scale_)
        standardised = torch.empty(buffer.shape, dtype=dtype, device=mean.device)  # reused: a chunk's graph is gone before the next is read

        kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # the first chunks, standardised once
        row_bytes = self.n_features_in_ * torch.finfo(dtype).bits // 8

        def chunks():
            for k, a in enumerate(starts):
                if k < len(kept):
                    yield kept[k]
                    continue
                rows = order[a : a + chunk_rows]
                keep = k == len(kept) and (k + 1) * chunk_rows * row_bytes <= keep_bytes
                Z = torch.empty((len(rows), self.n_features_in_), dtype=dtype, device=mean.device) if keep else standardised[: len(rows)]
                Z.copy_(torch.from_numpy(read(rows, buffer)))
                chunk = (Z.sub_(mean).div_(scale), as_tensor(labels[rows], torch.long), as_tensor(every[rows]) if every is not None else None)
                if keep:
                    kept.append(chunk)
                yield chunk

        t0 = time.perf_counter()
        with _threads(self.n_jobs):
            total = float(every.sum()) if every is not None else float(n)
            problem = ChunkedLogisticProblem(chunks, len(self.classes_), self.n_features_in_, total, dtype, head_device(self.device),
                                             world.all_reduce_ if distributed else None)
            subsample = lambda rows: as_tensor(scaler.transform(np.asarray(read(rows, None), dtype=np.float64)))  # noqa: E731
            W, b, n_iter = self._solve(problem, subsample, labels, weights, X_val, y_val, scaler, as_tensor, dtype, world if distributed else None)
        return self._finish(scaler, W, b, n_iter, t0, streamed=True)

    def _start(self, y: np.ndarray) -> np.ndarray:
        """Classes from the labels; the labels as class indices."""
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"Classifier can't train when only one class is present (class {self.classes_[0]!r}); give rows of at least 2 classes")
        return np.searchsorted(self.classes_, y)

    def _tensors(self, values: int):
        """The solver's dtype (float64, exact, unless the problem is large or on a GPU) and a numpy -> tensor converter."""
        device = head_device(self.device)
        dtype = torch.float64 if values <= FLOAT64_MAX_VALUES and device.type == "cpu" else torch.float32
        return dtype, lambda a, dt=dtype: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

    def _solve(self, problem: LogisticProblem, subsample, labels, weights, X_val, y_val, scaler, as_tensor, dtype, world: World | None = None):
        """C (given, or selected from warm-started paths), then the kept model on every training
        row; under torchrun (``world``) rank 0's C and warm start on every rank (thread counts
        may round the ranks' paths apart)."""
        warm = None
        self.cv_scores_, self.path_, self.C_at_edge_ = {}, [], ""
        if self.C is not None:
            self.C_ = float(self.C)
        else:
            selection = self._select(problem, subsample, labels, weights, X_val, y_val, scaler, as_tensor)
            if selection is None:  # too few rows per class to cross-validate
                self.C_ = 1.0
            else:
                self.C_, self.C_at_edge_ = selection.C, selection.at_edge
                self.cv_scores_ = {p.C: p.score for p in selection.points}
                self.path_ = [asdict(p) for p in selection.points]
                warm = tuple(torch.stack([s[i] for s in selection.warm]).mean(0) for i in range(2))
        if world is not None:
            self.C_, self.C_at_edge_, self.cv_scores_, self.path_, warm = world.broadcast((self.C_, self.C_at_edge_, self.cv_scores_, self.path_, warm))
        # in float64 the kept model is solved tighter than scikit-learn's tol (its predictions are compared
        # with scikit-learn's); in float32 (large sets) that would only spend iterations on rounding noise
        return problem.solve(self.C_, warm, tol=self.tol * (1e-2 if dtype == torch.float64 else 1.0), max_iter=self.max_iter)

    def _finish(self, scaler, W, b, n_iter, t0: float, streamed: bool) -> LogRegHead:
        self.fit_seconds_ = round(time.perf_counter() - t0, 4)
        self.pipeline_ = self._pipeline(scaler, W.double().cpu().numpy(), b.double().cpu().numpy())
        self.n_iter_ = np.array([n_iter])
        self.streamed_ = streamed
        return self

    def _row_weights(self, labels: np.ndarray, n_classes: int, as_tensor) -> torch.Tensor | None:
        """Per-row weights from ``class_weight``: None, "balanced" or {class label: weight}."""
        if self.class_weight is None:
            return None
        if self.class_weight == "balanced":
            return as_tensor(balanced_weights(labels, n_classes))
        per_class = np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_])
        return as_tensor(per_class[labels])

    def _select(self, full: LogisticProblem, subsample: Callable[[np.ndarray], torch.Tensor], labels, weights, X_val, y_val, scaler, as_tensor):
        """C on the validation rows (``full`` is the problem), or by stratified folds of a subsample
        of at most ``select_rows`` training rows (``subsample(rows)``: their standardised rows)."""
        grid = tuple(self.Cs) if self.Cs is not None else DEFAULT_CS
        refine = self.Cs is None  # a grid that was given is solved exactly as given
        if X_val is not None and y_val is not None and len(y_val):
            known = np.isin(y_val, self.classes_)
            Xv = as_tensor(scaler.transform(np.asarray(X_val, dtype=np.float64)[known]))
            Yv = as_tensor(np.searchsorted(self.classes_, np.asarray(y_val)[known]), torch.long)
            folds = [(full, Xv, Yv)]
        else:
            rows = stratified_subsample(labels, self.select_rows, self.random_state)
            n_folds = min(self.cv, int(np.bincount(labels[rows]).min()))
            if n_folds < 2 or len(grid) < 2:
                return None
            Zs = subsample(rows)
            Ys = as_tensor(labels[rows], torch.long)
            splitter = StratifiedKFold(n_folds, shuffle=True, random_state=self.random_state)
            folds = []
            for train, test in splitter.split(np.zeros(len(rows)), labels[rows]):
                tr, te = torch.as_tensor(train, device=Zs.device), torch.as_tensor(test, device=Zs.device)
                folds.append((LogisticProblem(Zs[tr], Ys[tr], len(self.classes_), weights(rows[train])), Zs[te], Ys[te]))
        # the default path only ranks C by accuracy: a looser tolerance; a given grid is solved as scikit-learn would
        return select_C(folds, grid, tol=self.path_tol if refine else self.tol, max_iter=self.max_iter, refine=refine)

    def _pipeline(self, scaler: StandardScaler, coef: np.ndarray, intercept: np.ndarray) -> Pipeline:
        clf = LogisticRegression(C=self.C_, max_iter=self.max_iter, tol=self.tol, class_weight=self.class_weight, random_state=self.random_state)
        clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, self.classes_
        clf.n_features_in_ = coef.shape[1]
        clf.n_iter_ = np.array([0])
        return Pipeline([("scale", scaler), ("clf", clf)])

    # -- predicting
    def decision_function(self, X) -> np.ndarray:
        check_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.pipeline_.decision_function(X)

    def predict_proba(self, X) -> np.ndarray:
        check_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.pipeline_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def as_linear(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean, scale, weight [C, D], bias [C]) of the equivalent standardise+linear layer."""
        check_fitted(self)
        scaler, clf = self.pipeline_.named_steps["scale"], self.pipeline_.named_steps["clf"]
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: softmax over (-z/2, z/2) equals sigmoid(z)
            coef = np.vstack([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        return scaler.mean_, scaler.scale_, coef, intercept

    # -- state for artifacts: arrays only, so loading needs no pickle
    def get_state(self) -> dict[str, Any]:
        scaler, clf = self.pipeline_.named_steps["scale"], self.pipeline_.named_steps["clf"]
        return {"classes": self.classes_, "mean": scaler.mean_, "scale": scaler.scale_, "var": scaler.var_,
                "coef": clf.coef_, "intercept": clf.intercept_, "C": self.C_, "n_features_in": self.n_features_in_}

    def set_state(self, state: dict[str, Any]) -> LogRegHead:
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = (np.asarray(state[k], dtype=np.float64) for k in ("mean", "scale", "var"))
        scaler.n_features_in_ = int(state["n_features_in"])
        scaler.n_samples_seen_ = 1
        self.classes_ = np.asarray(state["classes"])
        self.n_features_in_ = int(state["n_features_in"])
        self.C_, self.cv_scores_, self.path_, self.C_at_edge_ = float(state["C"]), {}, [], ""
        self.pipeline_ = self._pipeline(scaler, np.asarray(state["coef"], dtype=np.float64), np.asarray(state["intercept"], dtype=np.float64))
        self.n_iter_ = np.array([0])
        return self
