"""Likely label errors by confident learning (Northcutt, Jiang & Chuang, JAIR 2021).

This is cleanlab's ``cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=METHOD)``
for its two pruning methods, ``prune_by_class`` (featcache's default) and ``prune_by_noise_rate``
(cleanlab's default), with cleanlab's other defaults (``frac_noise=1``,
``min_examples_per_class=1``), written out so featcache does not depend on cleanlab; the tests
compare the masks with cleanlab's on the same out-of-fold probabilities. Why prune_by_class:
on the demo digits with 5 % of labels flipped (six seeds), it found 0.82-0.93 of the flips at
precision 0.87-0.94, prune_by_noise_rate only 0.73-0.83 at 0.89-0.94 (its per-cell counts of
the calibrated joint are small integers with 10 classes, and rounding drops flips). The steps,
each as cleanlab does them:

1. per-class thresholds t_k = mean predicted probability of class k over the rows labelled k
   (2 for a class no row has; at least 2e-6);
2. the confident joint C[given][true]: a row counts toward the class whose probability reaches
   its threshold (minus 1e-6), the most probable of them when several do; its diagonal at
   least 1, then calibrated to the label counts and rounded keeping row totals;
3. the prune counts: that matrix transposed, at least one row kept per class, truncated to
   integers as cleanlab does; then
   - prune_by_class: in each class k, the (rows labelled k - kept count of k) rows with the
     lowest probability of k are flagged;
   - prune_by_noise_rate: for every off-diagonal cell (given k, true j), its count of rows
     labelled k with the largest margin p_j - p_k are flagged;
4. a flagged row whose given label is (within 1e-6) the most probable is unflagged.

Suspects are ranked by self-confidence (probability of the given label), lowest first, as
``find_label_issues(..., return_indices_ranked_by="self_confidence")`` ranks them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix

from ..choices import LABEL_METHODS

EPS = 1e-6  # cleanlab's FLOATING_POINT_COMPARISON
CHUNK_ROWS = 65_536  # rows of [N, K] copied at a time
MISSING_CLASS_THRESHOLD = 2.0  # cleanlab's BIG_VALUE: a class no row has is never confidently predicted


@dataclass
class LabelIssues:
    mask: np.ndarray  # [N] bool: likely mislabelled
    ranked: np.ndarray  # indices of the flagged rows, lowest self-confidence first
    self_confidence: np.ndarray  # [N] probability of the given label
    suggested: np.ndarray  # [N] most probable class
    given: np.ndarray  # [N] the labels examined
    thresholds: np.ndarray  # [K] per-class confident thresholds
    confident_joint: np.ndarray  # [K, K] calibrated counts, [given][true]

    def __len__(self) -> int:
        return int(self.mask.sum())

    def per_class(self) -> np.ndarray:
        """[K, K] counts of the flagged rows: given label x suggested label."""
        k = len(self.thresholds)
        counts = np.zeros((k, k), dtype=np.int64)
        np.add.at(counts, (self.given[self.mask], self.suggested[self.mask]), 1)
        return counts


def confident_thresholds(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Mean probability of class k over the rows labelled k (cleanlab's ``get_confident_thresholds``)."""
    k = proba.shape[1]
    out = np.array([proba[labels == c, c].mean(dtype=np.float64) if (labels == c).any() else MISSING_CLASS_THRESHOLD for c in range(k)])
    return np.clip(out, 2 * EPS, None)


def _round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) sum (cleanlab's ``round_preserving_sum``)."""
    floats = np.asarray(values, dtype=float)
    ints = floats.round()
    orig_sum, int_sum = np.sum(floats).round(), np.sum(ints).round()
    while abs(int_sum - orig_sum) > EPS:
        diff = np.round(orig_sum - int_sum)
        increment = -1 if int(diff < 0.0) else 1
        changes = min(int(abs(diff)), len(values))
        for i in np.argsort(floats - ints)[::-increment][:changes]:
            ints[i] = ints[i] + increment
        int_sum = np.sum(ints).round()
    return ints.astype(int)


def _round_rows(matrix: np.ndarray) -> np.ndarray:
    return np.apply_along_axis(_round_preserving_sum, 1, matrix).astype(int)


def confident_joint(labels: np.ndarray, proba: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """[K, K] calibrated confident joint, rows = given label, columns = likely true label."""
    k = proba.shape[1]
    thresholds = confident_thresholds(labels, proba) if thresholds is None else thresholds
    confident = proba >= thresholds - EPS
    n_confident = confident.sum(axis=1)
    guess = np.where(n_confident > 1, proba.argmax(axis=1), confident.argmax(axis=1))
    some = n_confident > 0
    if some.any():
        joint = confusion_matrix(y_true=guess[some], y_pred=labels[some], labels=range(k)).T
    else:
        joint = np.zeros((k, k), dtype=int)
    np.fill_diagonal(joint, joint.diagonal().clip(min=1))
    counts = np.bincount(labels, minlength=k)
    calibrated = (joint.T / np.clip(joint.sum(axis=1), 1e-100, None) * counts).T
    calibrated = calibrated / np.clip(calibrated.sum(), 1e-100, None) * counts.sum()
    return _round_rows(calibrated)


def _prune_counts(joint: np.ndarray, keep: int = 1) -> np.ndarray:
    """cleanlab's ``_keep_at_least_n_per_class`` (``frac_noise=1``) on the transposed joint."""
    matrix = joint.T
    diagonal = np.diagonal(matrix)
    new_diagonal = np.maximum(diagonal, keep)
    per_col = np.maximum(np.count_nonzero(matrix, axis=0) - 1.0, 1.0)
    new = matrix - (new_diagonal - diagonal) / per_col
    new[new < 0] = 0
    np.fill_diagonal(new, new_diagonal)
    reduced = new * 1.0  # frac_noise = 1: _reduce_prune_counts keeps every count, then truncates to int
    np.fill_diagonal(reduced, new.diagonal() + np.sum(new - reduced, axis=0))
    return _round_rows(reduced.astype(int)).astype(int)


def find_label_issues(labels: np.ndarray, proba: np.ndarray, method: str = "prune_by_class") -> LabelIssues:
    """Rows whose given label is likely wrong, from out-of-fold probabilities (module doc).

    ``labels`` [N] are 0..K-1; ``proba`` [N, K] out-of-fold predicted probabilities;
    ``method`` prune_by_class or prune_by_noise_rate.
    """
    if method not in LABEL_METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(LABEL_METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    proba = np.asarray(proba)  # float64, or float32 from a large audit (no float64 copy of [N, K])
    k = proba.shape[1]
    thresholds = confident_thresholds(labels, proba)
    joint = confident_joint(labels, proba, thresholds)
    prune = _prune_counts(joint)
    mask = np.zeros(len(labels), dtype=bool)
    for given in range(k):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:  # min_examples_per_class
            continue
        flagged = np.zeros(len(members), dtype=bool)
        p = proba[members]
        if method == "prune_by_class":
            n = len(members) - prune[given, given]
            if n >= 1:
                flagged[np.argsort(p[:, given])[:n]] = True
            mask[members] = flagged
            continue
        for true in range(k):
            n = prune[true, given]
            if true != given and n > 0:
                margin = p[:, true] - p[:, given]
                flagged[np.argsort(-margin)[:n]] = True
        mask[members] = flagged
    for a in range(0, len(labels), CHUNK_ROWS):  # a chunk at a time: no copy of [N, K]
        bumped = proba[a : a + CHUNK_ROWS].astype(np.float64)
        bumped[np.arange(len(bumped)), labels[a : a + CHUNK_ROWS]] += EPS
        mask[a : a + CHUNK_ROWS][bumped.argmax(axis=1) == labels[a : a + CHUNK_ROWS]] = False  # the given label is (about) the most probable: keep it
    self_conf = proba[np.arange(len(labels)), labels].astype(np.float64)
    flagged_rows = np.flatnonzero(mask)
    ranked = flagged_rows[np.argsort(self_conf[flagged_rows])]  # as cleanlab orders them (its argsort, so ties fall alike)
    return LabelIssues(mask, ranked, self_conf, proba.argmax(axis=1), labels, thresholds, joint)
