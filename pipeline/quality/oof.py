"""Out-of-fold predicted probabilities: every labelled row scored by a model that never saw it.

Confident learning needs them (a model scoring its own training rows agrees with their
labels, errors included). K stratified folds of the fast logreg (``pipeline.heads``: torch
L-BFGS, scikit-learn's objective): C is chosen once, by the head's own warm-started path on
the first fold's training rows, then every fold is fitted at that C. The rows come in the
whitened principal-component space (``space.py``), which bounds the cost on wide embeddings
(2,048-d -> 128 components) and changes nothing a standardised linear model could use beyond
the dropped low-variance directions. On the demo digits with 5 % of labels flipped, 128
components found the flips best (six seeds, prune_by_class: precision >= 0.87, recall >= 0.87;
with 256 components or all 512 the worst seed's recall fell to 0.77-0.80).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..heads import LogRegHead, full_proba, stratified_subsample
from .spill import SpilledRows

CHANCE_ALPHA = 0.01
SCORE_ROWS = 65_536  # held-out rows scored at a time


def chance_test(labels: np.ndarray, correct: int) -> tuple[float, float]:
    """``(chance, p)``: the largest class's share of ``labels``, and the one-sided binomial
    p-value of ``correct`` right answers on ``len(labels)`` rows if the model were no better."""
    from scipy.stats import binomtest

    n = len(labels)
    chance = float(np.bincount(labels).max() / n)
    return chance, float(binomtest(correct, n, chance, alternative="greater").pvalue)


@dataclass
class OutOfFold:
    proba: Any  # [N, K]: an array, or float32 rows on disk (``spill.SpilledRows``) for a large audit
    folds: int
    C: float
    accuracy: float  # of the out-of-fold argmax against the given labels
    seconds: float
    chance: float  # accuracy of always answering the largest class
    p_value: float  # one-sided binomial test of ``accuracy`` > ``chance``

    @property
    def informative(self) -> bool:
        """Whether the model beats always answering the largest class (p < ``CHANCE_ALPHA``).
        Confident learning on a model that does not flags rows by noise: on random images
        with random labels it called 19 of 31 rows label errors."""
        return self.p_value < CHANCE_ALPHA


def fold_count(labels: np.ndarray, wanted: int) -> int:
    """``wanted`` folds, fewer when even the largest class has fewer rows (StratifiedKFold's limit).

    Raises:
        ValueError: no class has 2 rows (no two folds can be made).
    """
    largest = int(np.bincount(labels).max())
    if largest < 2:
        raise ValueError("out-of-fold probabilities need a class with at least 2 rows")
    return max(2, min(wanted, largest))


def out_of_fold_proba(Z: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0, C: float | None = None, *,
                      max_train_rows: int | None = None, dtype: type = np.float64, spill_beside: Path | None = None) -> OutOfFold:
    """[N, n_classes] probabilities of ``labels`` (0..n_classes-1) from ``folds``-fold
    cross-fitting on the rows of ``Z``; a class missing from a fold's training rows gets 0.
    ``C`` None: chosen on the first fold, then every fold at it; a number fixes it (the
    planted-flip refit of ``precision.py`` reuses the baseline's: no second search).

    ``Z`` may be rows on disk (``spill.py``): each fold then reads its training rows, at most
    ``max_train_rows`` of them (a stratified, seeded sample: the model has only k x classes
    weights, and a few hundred thousand rows pin them down). Every fold's model is fitted
    first, then the rows are scored once, in order, ``SCORE_ROWS`` at a time, each by the model
    that did not see it: ``dtype`` float32 halves the result, and ``spill_beside`` (a path)
    writes it to an unlinked file beside that path (``spill.SpilledRows``: 4 GB at 10 M rows
    x 100 classes never held) instead of memory.

    Raises:
        ValueError: fewer than 2 classes, or no class with 2 rows (the caller skips label errors).
        StorageError: no room for the spilled probabilities.
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError("out-of-fold probabilities need at least 2 classes")
    n_folds = fold_count(labels, folds)
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(labels), dtype=np.int8)
    heads: list[LogRegHead | int] = []  # a fitted head, or the one class a fold's training rows hold
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for f, (train, test) in enumerate(splitter.split(np.zeros((len(labels), 0)), labels)):  # one fold's indices at a time (5 at once: 0.4 GB at 10 M rows)
            fold_of[test] = f
            del test
            seen = np.unique(labels[train])
            if len(seen) < 2:  # the fold's other classes are all in its test rows: a model of one class says that class
                heads.append(int(seen[0]))
                continue
            if max_train_rows is not None and len(train) > max_train_rows:
                train = train[stratified_subsample(labels[train], max_train_rows, seed)]
            head = LogRegHead(C=C, random_state=seed, tol=1e-3)
            head.fit(Z[train], labels[train])
            C = head.C_
            heads.append(head)
            del train
    proba: Any = (SpilledRows(len(labels), n_classes, Path(spill_beside), "proba") if spill_beside is not None
                  else np.zeros((len(labels), n_classes), dtype=dtype))
    correct = 0
    for a in range(0, len(labels), SCORE_ROWS):
        block, where = np.asarray(Z[a : a + SCORE_ROWS]), fold_of[a : a + SCORE_ROWS]
        out = np.zeros((len(block), n_classes), dtype=dtype)
        for f, head in enumerate(heads):
            rows = np.flatnonzero(where == f)
            if isinstance(head, int):
                out[rows, head] = 1.0
            elif len(rows):
                out[rows] = full_proba(head, block[rows], n_classes)
        correct += int((out.argmax(axis=1) == labels[a : a + len(block)]).sum())
        if isinstance(proba, SpilledRows):
            proba.append(out)
        else:
            proba[a : a + len(block)] = out
    accuracy = correct / len(labels)
    chance, p_value = chance_test(labels, correct)
    return OutOfFold(proba, n_folds, float(C) if C is not None else float("nan"), accuracy, time.perf_counter() - t0, chance, p_value)
