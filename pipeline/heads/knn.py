"""``KNNHead``: the DINO / DINOv2 k-nearest-neighbour classifier on embeddings.

Features are L2-normalised; a query's neighbours are the ``k`` training rows of highest
cosine similarity; each votes for its class with weight ``exp(similarity / T)`` (T = 0.07)
and the votes, normalised, are the probabilities. Nothing is trained: ``fit`` keeps the
normalised training rows. Similarities are computed in chunks of training rows (bounded
memory whatever the training set), on the GPU when there is one. Several ``k`` are
scored in one pass (the top max(k) neighbours serve every smaller k) and the best on
validation rows is kept.

A training set larger than the memory budget stays in its cache (``fit_cache``): the head
then keeps the rows' paths and file hashes, reads their embeddings chunk by chunk for
every prediction, and refuses a cache in which any of them is gone or changed.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from ..errors import CacheError
from ..store import RowTable, encode_paths, iter_embeddings, read_rows, sha_hex
from .common import check_fitted, head_device


def _normalise(X: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(X, dim=1)


def _held_out_fifth(labels: np.ndarray, seed: int) -> np.ndarray:
    """A stratified fifth of the rows (never every row of a class) to choose k on."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) >= 2:
            held[rng.choice(members, size=min(len(members) - 1, max(1, round(len(members) / 5))), replace=False)] = True
    return held


class KNNHead(ClassifierMixin, BaseEstimator):
    """Cosine k-NN with temperature-weighted votes. ``k`` is one count or several; with
    several, ``fit`` keeps the one most accurate on ``X_val``/``y_val`` (or on a held-out
    fifth of the training rows when none are given)."""

    def __init__(self, k: int | tuple[int, ...] = 20, temperature: float = 0.07, chunk_rows: int = 16384, random_state: int = 0,
                 device: str = "auto"):
        self.k = k
        self.temperature = temperature
        self.chunk_rows = chunk_rows
        self.random_state = random_state
        self.device = device

    def _ks(self) -> tuple[int, ...]:
        ks = (self.k,) if isinstance(self.k, (int, np.integer)) else tuple(self.k)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"k must be one or more counts >= 1, got {self.k!r}")
        return tuple(sorted({int(k) for k in ks}))

    def fit(self, X, y, X_val=None, y_val=None) -> KNNHead:
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        ks = self._ks()
        self.classes_ = np.unique(y)
        labels = np.searchsorted(self.classes_, y)
        self.device_ = head_device(self.device)
        self.scores_: dict[int, float] = {}
        if len(ks) > 1:
            if X_val is None or y_val is None or not len(y_val):  # hold out a fifth of the training rows to choose k
                held = _held_out_fifth(labels, self.random_state)
                self._store(X[~held], labels[~held])
                Xv, yv = X[held], labels[held]
            else:
                self._store(X, labels)
                known = np.isin(y_val, self.classes_)
                Xv, yv = np.asarray(X_val)[known], np.searchsorted(self.classes_, np.asarray(y_val)[known])
            self._choose_k(Xv, yv, ks)
        else:
            self.k_ = ks[0]
        self._store(X, labels)
        return self

    def fit_cache(self, cache: str | Path, paths: list[str], sha256: list[str], y: np.ndarray, n_features: int, X_val=None, y_val=None) -> KNNHead:
        """Fit on training rows that stay in ``cache`` (named by path, checked by file hash)."""
        self.classes_ = np.unique(y)
        self.n_features_in_ = int(n_features)
        self.device_ = head_device(self.device)
        self.train_, self.cache_ = None, {"path": str(Path(cache).resolve()), "paths": list(paths), "sha256": list(sha256)}
        self.train_labels_ = torch.as_tensor(np.searchsorted(self.classes_, y), dtype=torch.long, device=self.device_)
        ks = self._ks()
        self.scores_, self.k_ = {}, ks[0]
        if len(ks) > 1 and X_val is not None and len(y_val):
            self._choose_k(np.asarray(X_val), np.searchsorted(self.classes_, y_val), ks)
        return self

    def _choose_k(self, X: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> None:
        """Score every k on validation rows in one pass; keep the best (the smallest on ties)."""
        truth = torch.as_tensor(labels, device=self.device_)
        self.scores_ = {k: float((v.argmax(1) == truth).double().mean()) for k, v in zip(ks, self._votes(X, ks))}
        top = max(self.scores_.values())
        self.k_ = min(k for k, s in self.scores_.items() if s == top)

    def _store(self, X: np.ndarray, labels: np.ndarray) -> None:
        self.train_, self.cache_ = _normalise(torch.tensor(np.asarray(X), dtype=torch.float32, device=self.device_)), None
        self.train_labels_ = torch.as_tensor(labels, dtype=torch.long, device=self.device_)

    def _cache_rows(self) -> tuple[RowTable, np.ndarray]:
        """The cache's current version and where the training rows sit in it (compaction moves
        them); refuses a cache that lost or changed any of them."""
        cache = Path(self.cache_["path"])
        try:
            table = read_rows(cache)
        except CacheError as exc:
            raise CacheError(f"this kNN head reads its training rows from {str(cache)!r}: {exc}") from None
        want = encode_paths(self.cache_["paths"])
        pos = np.minimum(np.searchsorted(table.paths_raw, want), max(len(table) - 1, 0))
        held = table.paths_raw[pos] == want if len(table) else np.zeros(len(want), bool)
        held &= sha_hex(table.fingerprints["sha256"][pos]) == np.array([h.encode() for h in self.cache_["sha256"]], dtype="S64")
        if not held.all():
            missing = self.cache_["paths"][int(np.flatnonzero(~held)[0])]
            raise CacheError(f"cache {str(cache)!r} no longer holds {int((~held).sum())} of this kNN head's training rows as fitted "
                             f"(e.g. {missing!r}); refit the head (fit-head --clf knn)")
        return table, table.index_rows[pos]

    def _train_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, normalised rows) of the training set, chunk by chunk."""
        if self.train_ is not None:
            for t0 in range(0, len(self.train_), self.chunk_rows):
                yield t0, self.train_[t0 : t0 + self.chunk_rows]
            return
        table, rows = self._cache_rows()
        with table:
            for pos, block in iter_embeddings(table, rows, chunk_rows=self.chunk_rows):
                yield pos.start, _normalise(torch.as_tensor(block, dtype=torch.float32, device=self.device_))

    def _votes(self, X: np.ndarray, ks: tuple[int, ...]) -> list[torch.Tensor]:
        """[n, n_classes] normalised votes for each k, from one pass over the training rows."""
        n_classes, kmax = len(self.classes_), min(max(ks), len(self.train_labels_))
        out = [torch.zeros(len(X), n_classes, dtype=torch.float64, device=self.device_) for _ in ks]
        query_rows = self.chunk_rows if self.train_ is not None else max(self.chunk_rows, 65536)  # fewer passes over a cache
        for q0 in range(0, len(X), query_rows):
            Q = _normalise(torch.tensor(np.asarray(X[q0 : q0 + query_rows]), dtype=torch.float32, device=self.device_))
            best_sim = torch.full((len(Q), 0), -2.0, device=self.device_)
            best_idx = torch.zeros((len(Q), 0), dtype=torch.long, device=self.device_)
            for t0, train in self._train_chunks():  # running top-kmax over chunks of training rows
                sim = Q @ train.T
                s, i = sim.topk(min(kmax, sim.shape[1]), dim=1)
                best_sim, pick = torch.cat([best_sim, s], 1).topk(min(kmax, best_sim.shape[1] + s.shape[1]), dim=1)
                best_idx = torch.cat([best_idx, i + t0], 1).gather(1, pick)
            weights = (best_sim.double() / self.temperature).exp()
            neighbour_labels = self.train_labels_[best_idx]
            for v, k in zip(out, ks):
                kk = min(k, weights.shape[1])
                v[q0 : q0 + len(Q)].scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
        return [v / v.sum(1, keepdim=True).clamp_min(1e-30) for v in out]

    def training_rows(self) -> torch.Tensor:
        """The normalised training rows [N, D] in the order of ``train_labels_`` (read from the
        cache when they stay there): what ``export-model`` puts in the graph."""
        check_fitted(self)
        out = torch.empty(len(self.train_labels_), self.n_features_in_, dtype=torch.float32, device=self.device_)
        for t0, rows in self._train_chunks():  # each chunk at its offset, whatever order a cache yields them in
            out[t0 : t0 + len(rows)] = rows
        return out

    def predict_proba(self, X) -> np.ndarray:
        check_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self._votes(X, (self.k_,))[0].double().cpu().numpy()

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # -- state for artifacts: arrays only (the normalised training rows are the model)
    def get_state(self) -> dict[str, Any]:
        rows = {"train": self.train_.cpu().numpy()} if self.train_ is not None else {
            "cache": self.cache_["path"], "cache_paths": self.cache_["paths"], "cache_sha256": self.cache_["sha256"]}
        return {"classes": self.classes_, "k": self.k_, **rows, "train_labels": self.train_labels_.cpu().numpy(),
                "scores": {str(k): v for k, v in self.scores_.items()}, "n_features_in": self.n_features_in_}

    def set_state(self, state: dict[str, Any]) -> KNNHead:
        self.device_ = head_device(self.device)
        self.classes_ = np.asarray(state["classes"])
        self.k_ = int(state["k"])
        if "train" in state:
            self.train_, self.cache_ = torch.as_tensor(np.asarray(state["train"], dtype=np.float32), device=self.device_), None
        else:
            self.train_ = None
            self.cache_ = {"path": str(state["cache"]), "paths": [str(p) for p in state["cache_paths"]], "sha256": [str(h) for h in state["cache_sha256"]]}
        self.train_labels_ = torch.as_tensor(np.asarray(state["train_labels"]), dtype=torch.long, device=self.device_)
        self.scores_ = {int(k): float(v) for k, v in dict(state.get("scores", {})).items()}
        self.n_features_in_ = int(state["n_features_in"])
        return self
