"""When is a training loss "diverged"? One rule for the torch heads, the grid and fine-tuning.

A loss that is NaN/inf has diverged at once. A finite loss has diverged when it is over
``max(100 x reference, reference + 10)``, where the reference is the loss at the start of
training (the first batch, computed before any update) but never less than chance level,
``ln(n_classes)``: a model that starts near-perfect (a trained head, a resumed fine-tune)
would otherwise get a limit so low that ordinary noise crosses it. Callers compare a mean
over many batches (an epoch, or the epoch so far), never one batch, so an early spike that
comes down again is not divergence. Cross-entropy that is 100 x chance means confidently
wrong logits hundreds of units apart: the learning rate, not the data, is to blame.
"""
from __future__ import annotations

import math

FACTOR = 100.0  # x the starting loss ...
MARGIN = 10.0  # ... or this much above it, whichever is higher


def chance_loss(n_classes: int) -> float:
    """Cross-entropy of a uniform guess over ``n_classes``."""
    return math.log(max(int(n_classes), 2))


def reference_loss(first_loss: float, n_classes: int) -> float:
    """The loss divergence is measured against: the starting loss, at least chance level."""
    floor = chance_loss(n_classes)
    return max(first_loss, floor) if math.isfinite(first_loss) else floor


class DivergenceGuard:
    """Says whether a (mean) training loss means training diverged, and how."""

    def __init__(self, reference_loss: float):
        self.reference = float(reference_loss)
        self.limit = max(FACTOR * self.reference, self.reference + MARGIN)

    @classmethod
    def starting_at(cls, first_loss: float, n_classes: int) -> DivergenceGuard:
        return cls(reference_loss(first_loss, n_classes))

    def problem(self, loss: float) -> str | None:
        """None when ``loss`` is fine, else what happened to it ("became nan", "grew to ...")."""
        if not math.isfinite(loss):
            return f"became {loss}"
        if loss > self.limit:
            return f"grew to {loss:.4g} (it started near {self.reference:.3g}; over {self.limit:.3g} counts as diverged)"
        return None

