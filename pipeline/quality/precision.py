"""How far to trust the label-error list on *this* data: planted flips, one extra out-of-fold fit.

Confident learning on out-of-fold probabilities flags the rows whose given label the model
finds improbable. With a strong model those are mostly wrong labels; with a weak one (few
examples, many classes, val/test in another style than train) they are mostly the model's own
mistakes: on a clean 54-class set with a ~70 % head it flagged 20 % of the correctly labelled
rows. So the audit measures the detector on the data at hand:

1. baseline: the flagged rows F0 of confident learning on the real labels;
2. plant: ``planted_count`` rows (3 % of the labelled rows, at least 20, at most 500, at most
   a quarter of the candidates), drawn at random (seeded) among the rows F0 does *not* flag, each
   moved to another class present in the data, in a copy of the labels;
3. refit: the same out-of-fold logreg (same folds, same seed, the baseline's C: no C search)
   on the copy, and confident learning on it: flagged rows F1;
4. measure, among the rows whose status is known — the planted ones and the rows the baseline
   did not flag (a row F0 flags may be a real error, so it counts neither way):

   - **recall** = planted rows flagged / planted rows;
   - **precision** = planted rows flagged / (planted rows flagged + non-planted rows outside
     F0 that F1 flags): the share of true errors among what the detector adds when errors
     are added. A strong model flags the planted rows and little else (demo digits with 5 %
     flips: 0.87-0.90); a weak one reshuffles its many doubtful rows and flags as many
     unplanted rows as planted ones (overlapping gaussians, ~78 % accuracy: 0.57).

The operating point: when the precision at cleanlab's own point is under ``POOR_PRECISION``
the detector is not reliable here, and its rows are shown as *hardest examples*, not label
errors. Otherwise the rows are the flagged rows whose probability of the given label is at or
under a threshold: none (1.0) when the precision already reaches ``TARGET_PRECISION``, else the
loosest that reaches it on the planted copy (the list is read by a person: a short list of
likely errors beats a long list of doubts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .label_errors import find_label_issues
from .oof import out_of_fold_proba

PLANT_SHARE = 0.03  # rows planted, as a share of the labelled rows
MIN_PLANTED = 20
MAX_PLANTED = 500
FEWEST_PLANTED = 5  # fewer possible: no estimate
POOR_PRECISION = 0.7  # below this (at cleanlab's point) the list is "hardest examples", not label errors
TARGET_PRECISION = 0.8  # the operating point: the loosest threshold that reaches this
HARDEST_SHARE = 0.02  # an unreliable list shows at most this share of the labelled rows (at least MIN_PLANTED)


@dataclass
class PrecisionEstimate:
    """The detector measured on planted flips (module doc)."""

    planted: int  # rows flipped in the copy
    precision: float  # at the operating point
    recall: float  # at the operating point
    threshold: float  # the operating point: flagged rows with p(given) <= this (1.0: cleanlab's point)
    precision_at_cleanlab: float  # at cleanlab's own point, which decides ``reliable``
    recall_at_cleanlab: float
    reliable: bool  # precision_at_cleanlab >= POOR_PRECISION
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"planted": self.planted, "precision": round(self.precision, 4), "recall": round(self.recall, 4),
                "threshold_given_probability": round(self.threshold, 6), "precision_at_cleanlab": round(self.precision_at_cleanlab, 4),
                "recall_at_cleanlab": round(self.recall_at_cleanlab, 4), "reliable": self.reliable, "poor_precision_below": POOR_PRECISION,
                "target_precision": TARGET_PRECISION, "seconds": round(self.seconds, 3),
                "definition": "planted label flips in a copy of the labels, out-of-fold fit rerun; recall = planted rows flagged / planted; "
                              "precision = planted flagged / (planted flagged + unplanted rows flagged that the real labels did not flag)"}


def planted_count(labelled: int, candidates: int) -> int:
    """Rows to plant: ``PLANT_SHARE`` of the labelled rows within [MIN_PLANTED, MAX_PLANTED], at most a quarter of ``candidates``."""
    return int(min(MAX_PLANTED, max(MIN_PLANTED, round(PLANT_SHARE * labelled)), candidates // 4))


def _rates(flagged: np.ndarray, planted: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of ``flagged`` on the ``planted`` rows, ``baseline``-flagged rows set aside (module doc)."""
    hits = int((flagged & planted).sum())
    added = int((flagged & ~planted & ~baseline).sum())
    return (hits / (hits + added) if hits + added else 0.0), hits / max(1, int(planted.sum()))


def estimate_precision(Z: np.ndarray, labels: np.ndarray, n_classes: int, baseline: np.ndarray, folds: int, seed: int, C: float,
                       method: str = "prune_by_class", **limits: Any) -> PrecisionEstimate | None:
    """Plant flips in a copy of ``labels`` (rows of ``Z``), refit out of fold at ``C``, and
    measure confident learning on them (module doc); ``baseline`` [N] bool is its mask on the
    real labels. None when too few rows can be planted. ``limits``: as ``out_of_fold_proba``'s."""
    t0 = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    pool = np.flatnonzero(~baseline)
    n = planted_count(len(labels), len(pool))
    if len(present) < 2 or n < FEWEST_PLANTED:
        return None
    rng = np.random.default_rng(seed)
    rows = rng.choice(pool, n, replace=False)
    flipped = labels.copy()
    for r in rows:  # another class present in the data, uniformly
        others = present[present != labels[r]]
        flipped[r] = others[rng.integers(len(others))]
    planted = np.zeros(len(labels), dtype=bool)
    planted[rows] = True
    oof = out_of_fold_proba(Z, flipped, n_classes, folds, seed, C=C if np.isfinite(C) else None, **limits)
    issues = find_label_issues(flipped, oof.proba, method)
    given = issues.self_confidence
    precision0, recall0 = _rates(issues.mask, planted, baseline)
    threshold, precision, recall = 1.0, precision0, recall0
    if precision0 >= POOR_PRECISION and precision0 < TARGET_PRECISION:
        for t in np.sort(np.unique(given[issues.mask & planted]))[::-1]:  # loosest first
            p, r = _rates(issues.mask & (given <= t), planted, baseline)
            if p >= TARGET_PRECISION:
                threshold, precision, recall = float(t), p, r
                break
    return PrecisionEstimate(n, precision, recall, threshold, precision0, recall0, precision0 >= POOR_PRECISION, time.perf_counter() - t0)
