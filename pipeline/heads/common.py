"""What every head shares: the not-fitted check and where a head computes."""
from __future__ import annotations

from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from ..devices import head_device

__all__ = ["check_fitted", "head_device"]


def check_fitted(est: BaseEstimator) -> None:
    """scikit-learn's NotFittedError (our subclass), with its wording, before ``fit``."""
    from ..errors import HeadNotFittedError

    try:
        check_is_fitted(est, "classes_")
    except Exception as exc:
        raise HeadNotFittedError(f"This {type(est).__name__} instance is not fitted yet. Call 'fit' with appropriate arguments before using this estimator.") from exc


