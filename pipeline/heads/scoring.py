"""Scoring many rows with a fitted head, fast: ``predict`` streams millions of cached rows
through it. A logistic regression is one float32 matrix product with its standardisation
folded into the weights (the same layer its ONNX export holds), run by torch on every core:
scikit-learn's float64 pipeline (standardise, then a float64 product) took 4.3 s of 29 for
100,000 x 2,048 rows and 100 classes. The result differs from ``predict_proba`` by float32
rounding (~1e-6); other heads score as they predict."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .fit import full_proba
from .logreg import LogRegHead


def head_scorer(head, n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """``rows [N, D] -> probabilities [N, n_classes]`` for ``head`` (columns of classes the head
    never saw are 0, as :func:`full_proba` places them)."""
    if not isinstance(head, LogRegHead):
        return lambda X: full_proba(head, X, n_classes)
    mean, scale, coef, intercept = head.as_linear()
    weight = coef / scale  # x_std @ W.T = (x - mean) / scale @ W.T
    bias = intercept - weight @ mean
    w = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    b = torch.from_numpy(bias.astype(np.float32))
    columns = torch.as_tensor(np.asarray(head.classes_, dtype=np.int64))

    def score(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            proba = torch.softmax(torch.addmm(b, torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), w), dim=1)
            out = torch.zeros((len(X), n_classes), dtype=torch.float32)
            out[:, columns] = proba
        return out.numpy()

    return score
