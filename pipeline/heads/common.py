"""What every head shares: the not-fitted check and where a head computes."""
from __future__ import annotations

from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..devices import head_device
from ..errors import FeatcacheError

__all__ = ["HeadNotFittedError", "check_fitted", "head_device"]


class HeadNotFittedError(FeatcacheError, NotFittedError):
    """A head used before ``fit``; also a scikit-learn ``NotFittedError``."""


def check_fitted(est: BaseEstimator) -> None:
    """scikit-learn's NotFittedError (our subclass), with its wording, before ``fit``."""
    try:
        check_is_fitted(est, "classes_")
    except Exception as exc:
        raise HeadNotFittedError(f"This {type(est).__name__} instance is not fitted yet. Call 'fit' with appropriate arguments before using this estimator.") from exc


