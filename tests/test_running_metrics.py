"""Metrics over predictions that arrive in chunks equal scikit-learn's on every row at once."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support, top_k_accuracy_score

from pipeline.heads import RunningMetrics, classification_metrics


@pytest.mark.parametrize("classes, dtype", [(3, np.float64), (12, np.float32)])
def test_chunked_metrics_equal_scikit_learns_on_all_rows(classes, dtype):
    rng = np.random.default_rng(classes)
    n = 1_000
    y = rng.integers(0, classes - 1, n)  # the last class never occurs: its P/R/F1 are 0, as scikit-learn's zero_division=0
    logits = rng.standard_normal((n, classes)) + 2.0 * np.eye(classes)[y]
    proba = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(dtype)
    proba[:50] = np.round(proba[:50], 1)  # ties for the top-5 order and the argmax
    proba[50, y[50]] = 0.0  # a zero probability of the given class: clipped, as scikit-learn does
    names = [f"c{i}" for i in range(classes)]
    running = RunningMetrics(names)
    for a in range(0, n, 137):  # uneven chunks
        running.add(y[a : a + 137], proba[a : a + 137])
    got = running.result()

    labels = np.arange(classes)
    pred = proba.argmax(1)
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert got["n"] == n
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert got["log_loss"] == pytest.approx(log_loss(y, proba / proba.sum(1, keepdims=True), labels=labels), rel=1e-6)
    assert got["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    for i, c in enumerate(names):
        assert got["per_class"][c] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}, abs=1e-12)
    if classes > 5:
        assert got["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=5, labels=labels), abs=1e-12)
    else:
        assert "top5_accuracy" not in got
    whole = classification_metrics(y, proba, names)  # the same accumulator, all rows in one chunk
    assert whole["log_loss"] == pytest.approx(got.pop("log_loss"), rel=1e-9) and {k: v for k, v in whole.items() if k != "log_loss"} == got


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        RunningMetrics(["a", "b", "c"]).add(np.array([0, 3]), np.full((2, 3), 1 / 3))
