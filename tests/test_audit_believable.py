"""The audit's findings are believable: the label-error list carries its precision measured on
planted flips, a weak model's doubts are shown as hardest examples (never "drop the labels"),
and split leaks come first in the listing. Synthetic gaussian embeddings, no backbone."""
from __future__ import annotations

import numpy as np

from pipeline.quality import advice, format_audit, run_audit


def gaussians(n: int, k: int, dims: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (k, dims))
    y = rng.integers(0, k, n)
    return (means[y] + rng.normal(0, 1, (n, dims))).astype(np.float32), y


def audited(X, labels, k, split=None):
    paths = np.array([f"c{y}/{i}.png" for i, y in enumerate(labels)])
    split = np.array(["train"] * len(labels), dtype=object) if split is None else split
    return run_audit(X, labels, split, paths, [f"c{i}" for i in range(k)])


def test_separated_classes_with_flips_report_a_good_estimate_and_find_the_flips():
    X, y = gaussians(1000, 5, 16, 3.0, seed=0)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(y), 50, replace=False)  # 5 %
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 5, len(flipped))) % 5
    audit = audited(X, noisy, 5)
    est = audit.estimate
    assert est is not None and est.reliable and est.planted == 30
    assert est.precision >= 0.8 and est.recall >= 0.8, est
    found = set(audit.label_error_rows().tolist())
    hits = len(found & set(flipped.tolist()))
    assert hits / len(found) >= 0.8 and hits / len(flipped) >= 0.8, (hits, len(found))
    out = audit.to_dict()
    assert out["label_errors_reliable"] is True and out["label_errors_estimate"]["precision"] >= 0.8 and not out["hardest_examples"]
    assert out["counts"]["label-errors"] == len(found)
    text = format_audit(audit, advice(audit))
    assert "planted flips" in text and "precision" in text and "hardest examples" not in text
    assert not any("drop" in a for a in advice(audit))


def test_a_weak_model_on_clean_labels_shows_hardest_examples_not_label_errors():
    X, y = gaussians(2000, 20, 32, 0.45, seed=2)  # heavily overlapping, labels all correct
    audit = audited(X, y, 20)
    assert audit.oof.informative and audit.oof.accuracy < 0.85  # a weak head, yet better than chance
    assert len(audit.issues) > 0.02 * len(y)  # what confident learning alone would have called label errors
    est = audit.estimate
    assert est is not None and not est.reliable and est.precision_at_cleanlab < 0.7
    assert len(audit.label_error_rows()) <= 0.02 * len(y) and audit.counts()["label-errors"] == 0
    assert 0 < len(audit.hardest_rows()) <= max(20, 0.02 * len(y))
    out = audit.to_dict()
    assert out["label_errors_reliable"] is False and out["label_errors"] == [] and out["hardest_examples"]
    text = format_audit(audit, advice(audit))
    assert "hardest examples" in text and "not reliable" in text and "estimated precision" in text
    todo = " ".join(advice(audit))
    assert "hardest example" in todo and "not reliable" in todo and "drop" not in todo


def test_leaks_are_listed_first():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 16)).astype(np.float32)
    split = np.array(["train"] * 60, dtype=object)
    for a, b in ((1, 0), (3, 2), (5, 4)):  # copies within train
        X[a] = X[b]
    X[59] = X[10]
    split[59] = "val"  # one copy across splits, found last
    labels = np.arange(60) % 3
    audit = audited(X, labels, 3, split)
    assert audit.counts()["leaks"] == 1 and len(audit.duplicates) == 4
    first = audit.to_dict()["duplicates"][0]
    assert first["leak"] and {first["split_a"], first["split_b"]} == {"train", "val"}
    listing = format_audit(audit, [], limit=1)
    assert "1 leak(s) across splits" in listing and "LEAK" in listing  # the one pair shown is the leak
