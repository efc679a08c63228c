"""Heads: the scikit-learn contract, and numbers against scikit-learn itself."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.heads.estimators import LinearHead, LogRegHead, MLPHead

FAST = [LogRegHead(Cs=(0.1, 1.0), cv=2), LinearHead(epochs=200, lr=5e-2, device="cpu"), MLPHead(hidden=(16,), dropout=(0.0,), epochs=30, lr=1e-2, device="cpu")]


@parametrize_with_checks(FAST)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


@pytest.mark.parametrize("head", [LogRegHead(), LinearHead(device="cpu"), MLPHead(device="cpu")])
def test_not_fitted_error(head):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        head.predict(np.zeros((1, 4)))


def test_logreg_fixed_C_equals_sklearn(digits):
    Xtr, Xte, ytr, yte = digits
    ours = LogRegHead(C=0.5).fit(Xtr, ytr)
    scaler = StandardScaler().fit(Xtr)
    ref = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(scaler.transform(Xtr), ytr)
    np.testing.assert_array_equal(ours.predict(Xte), ref.predict(scaler.transform(Xte)))
    np.testing.assert_allclose(ours.predict_proba(Xte), ref.predict_proba(scaler.transform(Xte)), atol=1e-6)


def test_logreg_picks_C_by_cv(digits):
    Xtr, _, ytr, _ = digits
    head = LogRegHead(Cs=(1e-4, 1.0), cv=3).fit(Xtr, ytr)
    assert head.C_ == 1.0 and set(head.cv_scores_) == {1e-4, 1.0}


def test_linear_head_within_one_point_of_logreg_on_a_cache(digits_cache):
    from pipeline import load_cache

    c = load_cache(digits_cache)
    Xtr, Xte, ytr, yte = train_test_split(c.embeddings, c.labels, test_size=0.2, random_state=0, stratify=c.labels)
    ref = LogRegHead(C=1.0).fit(Xtr, ytr).score(Xte, yte)
    lin = LinearHead(device="cpu").fit(Xtr, ytr).score(Xte, yte)
    assert ref > 0.9 and lin >= ref - 0.01, (lin, ref)


def test_torch_head_deterministic(digits):
    Xtr, Xte, ytr, _ = digits
    a = MLPHead(device="cpu", epochs=5).fit(Xtr, ytr).predict_proba(Xte)
    b = MLPHead(device="cpu", epochs=5).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)


def test_heads_work_with_sklearn_model_selection(digits):
    Xtr, _, ytr, _ = digits
    scores = cross_val_score(LinearHead(device="cpu", epochs=20, lr=1e-2), Xtr, ytr, cv=3)
    assert scores.mean() > 0.9
    grid = GridSearchCV(MLPHead(device="cpu", epochs=10, hidden=(32,), dropout=(0.0,)), {"lr": [1e-4, 1e-2]}, cv=2).fit(Xtr, ytr)
    assert grid.best_params_["lr"] == 1e-2


def test_state_roundtrip(digits):
    Xtr, Xte, ytr, _ = digits
    for head in (LogRegHead(C=1.0), MLPHead(device="cpu", epochs=3)):
        head.fit(Xtr, ytr)
        clone = type(head)(**head.get_params()).set_state(head.get_state())
        np.testing.assert_allclose(clone.predict_proba(Xte), head.predict_proba(Xte), atol=1e-6)


def test_logreg_as_linear_is_equivalent(digits):
    Xtr, Xte, ytr, _ = digits
    head = LogRegHead(C=1.0).fit(Xtr, ytr)
    mean, scale, W, b = head.as_linear()
    logits = ((Xte - mean) / scale) @ W.T + b
    np.testing.assert_array_equal(head.classes_[logits.argmax(1)], head.predict(Xte))
