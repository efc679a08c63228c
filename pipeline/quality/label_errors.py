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
from typing import Any

import numpy as np

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
    return _thresholds(labels, _given_probability(labels, proba), proba.shape[1])


def _given_probability(labels: np.ndarray, proba: Any) -> np.ndarray:
    """[N] float64 probability of each row's label, ``proba`` read ``CHUNK_ROWS`` rows at a time."""
    out = np.empty(len(labels), dtype=np.float64)
    for a in range(0, len(labels), CHUNK_ROWS):
        block = proba[a : a + CHUNK_ROWS]
        out[a : a + len(block)] = block[np.arange(len(block)), labels[a : a + len(block)]]
    return out


def _thresholds(labels: np.ndarray, given: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k)
    sums = np.array([given[labels == c].sum() for c in range(k)]) if len(labels) else np.zeros(k)
    out = np.where(counts > 0, sums / np.maximum(counts, 1), MISSING_CLASS_THRESHOLD)
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


def confident_joint(labels: np.ndarray, proba: Any, thresholds: np.ndarray | None = None) -> np.ndarray:
    """[K, K] calibrated confident joint, rows = given label, columns = likely true label.
    ``proba`` [N, K] is read ``CHUNK_ROWS`` rows at a time (an array, or rows on disk)."""
    k = proba.shape[1]
    thresholds = confident_thresholds(labels, proba) if thresholds is None else thresholds
    joint = np.zeros((k, k), dtype=np.int64)
    for a in range(0, len(labels), CHUNK_ROWS):
        p = np.asarray(proba[a : a + CHUNK_ROWS])
        confident = p >= thresholds - EPS
        n_confident = confident.sum(axis=1)
        guess = np.where(n_confident > 1, p.argmax(axis=1), confident.argmax(axis=1))
        some = n_confident > 0
        joint += np.bincount(labels[a : a + len(p)][some] * k + guess[some], minlength=k * k).reshape(k, k)
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


def find_label_issues(labels: np.ndarray, proba: Any, method: str = "prune_by_class") -> LabelIssues:
    """Rows whose given label is likely wrong, from out-of-fold probabilities (module doc).

    ``labels`` [N] are 0..K-1; ``proba`` [N, K] out-of-fold predicted probabilities, float64 or
    float32, in memory or on disk (``spill.SpilledRows``): it is read ``CHUNK_ROWS`` rows at a
    time, and prune_by_noise_rate reads one class's rows at a time, so nothing [N, K] is
    copied; ``method`` prune_by_class or prune_by_noise_rate.
    """
    if method not in LABEL_METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(LABEL_METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    n, k = len(labels), proba.shape[1]
    self_conf = _given_probability(labels, proba)
    thresholds = _thresholds(labels, self_conf, k)
    joint = confident_joint(labels, proba, thresholds)
    prune = _prune_counts(joint)
    mask = np.zeros(n, dtype=bool)
    for given in range(k):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:  # min_examples_per_class
            continue
        flagged = np.zeros(len(members), dtype=bool)
        if method == "prune_by_class":
            count = len(members) - prune[given, given]
            if count >= 1:
                flagged[np.argsort(self_conf[members])[:count]] = True
        else:
            trues = [t for t in range(k) if t != given and prune[t, given] > 0]
            p = np.asarray(proba[members]) if trues else None  # this class's rows only
            for true in trues:
                margin = p[:, true] - p[:, given]
                flagged[np.argsort(-margin)[: prune[true, given]]] = True
        mask[members] = flagged
    suggested = np.empty(n, dtype=np.int64)
    for a in range(0, n, CHUNK_ROWS):
        block = np.asarray(proba[a : a + CHUNK_ROWS])
        suggested[a : a + len(block)] = block.argmax(axis=1)
        bumped = block.astype(np.float64)
        bumped[np.arange(len(bumped)), labels[a : a + len(block)]] += EPS
        mask[a : a + len(block)][bumped.argmax(axis=1) == labels[a : a + len(block)]] = False  # the given label is (about) the most probable: keep it
    flagged_rows = np.flatnonzero(mask)
    ranked = flagged_rows[np.argsort(self_conf[flagged_rows])]  # as cleanlab orders them (its argsort, so ties fall alike)
    return LabelIssues(mask, ranked, self_conf, suggested, labels, thresholds, joint)
