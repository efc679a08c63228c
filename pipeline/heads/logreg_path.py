"""L2 logistic regression solved in torch, and C chosen along a warm-started path.

The objective is scikit-learn's (``LogisticRegression(solver="lbfgs")``)::

    sum_i s_i * CE(x_i W^T + b, y_i) / S  +  ||W||^2 / (2 C S)        S = sum_i s_i

multinomial for three or more classes, binary (one weight row, sigmoid) for two, the
intercept never penalised. It is minimised by full-batch L-BFGS with a strong-Wolfe line
search, on the GPU when there is one.

Choosing C costs what scikit-learn's ``LogisticRegressionCV`` costs only at its cheapest:
each fold walks the grid from strong to weak regularisation, every solve starting from
the previous C's solution (the path, as ``_logistic_regression_path`` does); the path
stops once ``patience`` decades past the best have not beaten it (weak
regularisation is where L-BFGS needs the most iterations, and nearly separable features
never reach a better score there); then the half- and quarter-decade neighbours of the
best are solved (coarse to fine). Large training sets choose C on a stratified subsample.

The walk never stops below ``MIN_STOP_C``: at very strong regularisation the solution is
C times the gradient at zero, whose argmax does not change with C, so the first decades
often score the same (a plateau, not a peak). On 100-400 whitened digit embeddings the
path used to stop there and choose C = 1e-6 (accuracy 0.28 where C = 0.1 gave 0.83).
Those solves are the cheapest of the path.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 4, 11))  # decades; refinement adds half and quarter decades
MIN_STOP_C = 1e-2  # the path walks at least this far (see the module doc)


@dataclass
class PathPoint:
    """One C of the path: mean validation accuracy over the folds, work done."""

    C: float
    score: float
    n_iter: int
    seconds: float


@dataclass
class Selection:
    C: float
    points: list[PathPoint]
    warm: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per fold, at C
    at_edge: str = ""  # "smallest" / "largest" when C is the end of the grid


class LogisticProblem:
    """One training set: rows already standardised, labels 0..K-1, optional sample weights."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, n_classes: int, sample_weight: torch.Tensor | None = None):
        self.X, self.y, self.n_classes = X, y, n_classes
        self.w = sample_weight
        self.total = float(sample_weight.sum()) if sample_weight is not None else float(len(y))
        self.rows = 1 if n_classes == 2 else n_classes

    def zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.X.shape[1]
        return (torch.zeros(self.rows, d, dtype=self.X.dtype, device=self.X.device),
                torch.zeros(self.rows, dtype=self.X.dtype, device=self.X.device))

    def logits(self, X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = X @ W.T + b
        if self.n_classes == 2:  # binary: softmax over (0, z) is sigmoid(z), as scikit-learn's binary model
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        return z

    def objective(self, W: torch.Tensor, b: torch.Tensor, C: float) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(self.logits(self.X, W, b), self.y, reduction="none")
        data = (ce * self.w).sum() if self.w is not None else ce.sum()
        return data / self.total + (W * W).sum() / (2.0 * C * self.total)

    def loss_and_gradient(self, W: torch.Tensor, b: torch.Tensor, C: float) -> torch.Tensor:
        """The objective at (W, b), its gradient left in ``W.grad``/``b.grad``."""
        loss = self.objective(W, b, C)
        loss.backward()
        return loss.detach()

    def solve(self, C: float, start: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-4,
              max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Minimise at ``C`` from ``start`` (zeros if None) until the largest gradient entry is
        below ``tol`` (scikit-learn's lbfgs criterion) or ``max_iter`` iterations."""
        W0, b0 = start if start is not None else self.zeros()
        W = W0.detach().clone().requires_grad_(True)
        b = b0.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            return self.loss_and_gradient(W, b, C)

        opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
        return W.detach(), b.detach(), n_iter

    def accuracy(self, X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return float((self.logits(X, W, b).argmax(1) == y).double().mean())



class ChunkedLogisticProblem(LogisticProblem):
    """The same objective summed over row chunks read one at a time (``chunks()`` yields
    standardised rows, labels and weights or None): memory is one chunk plus the model,
    whatever the number of rows. ``reduce`` (torchrun) sums the loss and gradient of each
    rank's rows over the ranks before the penalty is added once: every rank then takes the
    same L-BFGS steps as one process holding every row."""

    def __init__(self, chunks: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]], n_classes: int, dim: int,
                 total: float, dtype: torch.dtype, device: torch.device, reduce: Callable[[list[torch.Tensor]], None] | None = None):
        self.chunks, self.n_classes, self.total, self.reduce = chunks, n_classes, total, reduce
        self.rows = 1 if n_classes == 2 else n_classes
        self.dim, self.dtype, self.device = dim, dtype, device

    def zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(self.rows, self.dim, dtype=self.dtype, device=self.device),
                torch.zeros(self.rows, dtype=self.dtype, device=self.device))

    def loss_and_gradient(self, W: torch.Tensor, b: torch.Tensor, C: float) -> torch.Tensor:
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        for X, y, w in self.chunks():
            ce = torch.nn.functional.cross_entropy(self.logits(X, W, b), y, reduction="none")
            part = ((ce * w).sum() if w is not None else ce.sum()) / self.total
            part.backward()
            loss += part.detach()
        if self.reduce is not None:  # torchrun: every rank summed its own rows; the sums of all of them, on every rank
            for p in (W, b):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.reduce([loss, W.grad, b.grad])
        reg = (W * W).sum() / (2.0 * C * self.total)
        reg.backward()
        return loss + reg.detach()

def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"``: n / (K * count), per row."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(n_classes)
    per_class[present] = len(y) / (present.sum() * counts[present])
    return per_class[y]


def stratified_subsample(y: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """About ``rows`` row indices with every class in proportion (at least 2 per class where it has them)."""
    if len(y) <= rows:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        take = max(min(2, len(members)), int(round(len(members) * rows / len(y))))
        keep.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(keep))


def select_C(folds: list[tuple[LogisticProblem, torch.Tensor, torch.Tensor]], Cs: tuple[float, ...], *, tol: float, max_iter: int,
             refine: bool = True, patience: int = 2) -> Selection:
    """Walk ``Cs`` (ascending) on every fold with warm starts, keep the C of the best mean
    validation accuracy (the smallest C on ties, as ``LogisticRegressionCV``), then refine.

    ``folds`` holds (training problem, validation rows, validation labels) per fold.
    ``refine=False`` solves exactly ``Cs`` (for comparisons with scikit-learn on one grid).
    """
    Cs = tuple(sorted(float(c) for c in Cs))
    solutions: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    points: dict[float, PathPoint] = {}

    def evaluate(C: float, start_from: float | None) -> None:
        t0, iters, scores, sols = time.perf_counter(), 0, [], []
        for f, (problem, Xv, yv) in enumerate(folds):
            start = solutions[start_from][f] if start_from is not None else None
            W, b, n = problem.solve(C, start, tol=tol, max_iter=max_iter)
            iters += n
            scores.append(problem.accuracy(Xv, yv, W, b))
            sols.append((W, b))
        solutions[C] = sols
        points[C] = PathPoint(C, float(np.mean(scores)), iters, round(time.perf_counter() - t0, 4))

    def best() -> float:
        top = max(p.score for p in points.values())
        return min(c for c, p in points.items() if p.score == top)

    previous = None
    for C in Cs:
        evaluate(C, previous)
        previous = C
        if refine and C >= MIN_STOP_C and sum(c > best() for c in points) >= patience:
            break  # no better score in `patience` steps past the best: weaker regularisation will not win
    if refine:
        for step in (0.5, 0.25):
            centre = best()
            for C in (centre * 10 ** -step, centre * 10 ** step):
                if Cs[0] <= C <= Cs[-1] and not any(math.isclose(C, c, rel_tol=1e-9) for c in points):
                    lower = [c for c in points if c < C]
                    evaluate(C, max(lower) if lower else None)
    chosen = best()
    edge = "smallest" if math.isclose(chosen, Cs[0]) else "largest" if math.isclose(chosen, Cs[-1]) else ""
    return Selection(chosen, [points[c] for c in sorted(points)], solutions[chosen], edge)
