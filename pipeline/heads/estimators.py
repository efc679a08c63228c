"""Stage 2 heads behind one scikit-learn estimator contract.

``LogRegHead`` (scikit-learn logistic regression on standardised features, C chosen by
cross-validation), ``LinearHead`` and ``MLPHead`` (torch, trained on cached arrays) all
take hyperparameters in ``__init__``, learn in ``fit``, expose learned state with a
trailing underscore (``classes_``, ``n_features_in_``) and raise ``NotFittedError``
before ``fit`` — so they are interchangeable and work with ``cross_val_score`` and
``GridSearchCV``.

Torch heads are built in ``initialize_module`` and trained by small overridable steps
(``get_batches``, ``train_step``, ``evaluation_step``), as in skorch. Their first layer
is a fixed standardisation (``mean_``/``scale_``), so stage 3 can bolt the module onto a
backbone unchanged.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data
from torch import nn

from ..choices import HEAD_KINDS  # noqa: F401  (re-exported: pipeline.heads.HEAD_KINDS)
from ..distributed import World
from ..divergence import DivergenceGuard
from ..errors import TrainingDivergedError
from .common import check_fitted as _check_fitted
from .common import head_device as _device
from .knn import KNNHead
from .logreg import LogRegHead

# ----------------------------------------------------------------------------- torch heads


class BatchSource(Protocol):
    """Where training rows come from: arrays in memory, or a cache streamed in chunks."""

    n_rows: int

    def shares(self, batch_size: int, shuffle: bool, rng: np.random.Generator, rank: int = 0,
               size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        """The global batches (the same on every rank for the same ``rng``), as this rank's
        share of each: ``(X, y, first, y_batch)``, rows ``first..first+len(X)`` of a batch
        whose labels are ``y_batch`` (``batch_share``). One rank: the whole batches."""
        ...

    def moments(self, world: World | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def batch_share(batch: np.ndarray, rank: int, size: int) -> tuple[int, np.ndarray]:
    """``(first, rows)``: rank ``rank``'s contiguous part of ``batch`` among ``size`` ranks
    (``np.array_split``'s parts: sizes differ by at most one)."""
    q, r = divmod(len(batch), size)
    first = rank * q + min(rank, r)
    return first, batch[first : first + q + (rank < r)]


class ArraySource:
    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.y, self.n_rows = X, y, len(X)

    def shares(self, batch_size, shuffle, rng, rank=0, size=1):
        order = rng.permutation(self.n_rows) if shuffle else np.arange(self.n_rows)
        for i in range(0, self.n_rows, batch_size):
            batch = order[i : i + batch_size]
            first, idx = batch_share(batch, rank, size)
            yield self.X[idx], self.y[idx], first, self.y[batch]

    def batches(self, batch_size: int, shuffle: bool, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for X, y, _, _ in self.shares(batch_size, shuffle, rng):
            yield X, y

    def moments(self, world: World | None = None):
        return self.X.mean(axis=0, dtype=np.float64), self.X.std(axis=0, dtype=np.float64)


class Standardize(nn.Module):
    """Fixed (x - mean) / scale, stored as buffers so it travels with the state dict."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class BatchDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn for the whole global batch and cut to this rank's
    rows (``rows``: first row, rows in the global batch), so ranks under torchrun drop what one
    process training on the whole batch drops (every rank draws the same numbers from the same
    seed). Without ``rows`` the batch is the input itself. No parameters: a head saved with
    ``nn.Dropout`` loads unchanged."""

    rows: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        first, total = self.rows if self.rows is not None else (0, len(x))
        keep = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep[first : first + len(x)] / (1 - self.p)


def build_head_module(in_dim: int, n_classes: int, hidden: tuple[int, ...], dropout: tuple[float, ...]) -> nn.Sequential:
    """Standardize -> [Linear -> ReLU -> Dropout]* -> Linear."""
    layers: list[nn.Module] = [Standardize(in_dim)]
    width = in_dim
    drops = list(dropout) + [dropout[-1] if dropout else 0.0] * max(0, len(hidden) - len(dropout))
    for h, p in zip(hidden, drops):
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), BatchDropout(p)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def class_weight_vector(class_weight: str | dict | None, classes: np.ndarray, labels: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """The loss's per-class weights for ``class_weight`` ("balanced" or {label: weight}), 1 for
    classes absent from ``labels``; None without class weights."""
    if class_weight is None:
        return None
    present = np.unique(labels)
    w = np.ones(len(classes), dtype=np.float32)
    w[np.searchsorted(classes, present)] = compute_class_weight(class_weight, classes=present, y=labels)
    return torch.as_tensor(w, device=device)


class TorchHead(ClassifierMixin, BaseEstimator):
    """A torch classifier on embeddings: AdamW, cosine/step schedule, early stopping.

    ``fit(X, y)`` holds out ``val_fraction`` (stratified, seeded) for early stopping unless
    ``X_val``/``y_val`` are given. Deterministic on CPU for a given ``random_state``.
    """

    def __init__(self, hidden: tuple[int, ...] = (), dropout: tuple[float, ...] = (), lr: float = 1e-3,
                 weight_decay: float = 1e-4, epochs: int = 100, batch_size: int = 256, schedule: str = "cosine",
                 label_smoothing: float = 0.0, patience: int = 10, val_fraction: float = 0.1,
                 class_weight: str | None = None, refit_full: bool = True, device: str = "auto", random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.schedule = schedule
        self.label_smoothing = label_smoothing
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.refit_full = refit_full
        self.device = device
        self.random_state = random_state

    # -- overridable steps
    def initialize_module(self, in_dim: int, n_classes: int) -> nn.Module:
        return build_head_module(in_dim, n_classes, tuple(self.hidden), tuple(self.dropout))

    def get_batches(self, source: BatchSource, shuffle: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]:
        """This rank's share of each global batch as tensors: ``(x, y, first, y_batch)`` (``BatchSource.shares``)."""
        w = self._world
        for X, y, first, y_batch in source.shares(self.batch_size, shuffle, self._rng, w.rank, w.size):
            yield (torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device_), self._class_index(y), first, self._class_index(y_batch))

    def _class_index(self, y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.searchsorted(self.classes_, y), dtype=torch.long, device=self.device_)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, first: int = 0, y_batch: torch.Tensor | None = None) -> float:
        """One optimiser step on the global batch ``y_batch`` of which ``xb, yb`` are this rank's
        rows from ``first``: the loss is this share's sum over the batch's total weight, so the
        gradients summed over the ranks are one process's gradient of the batch mean. Returns
        the batch's mean loss times its rows (every rank the same)."""
        y_batch = yb if y_batch is None else y_batch
        self.module_.train()
        self._optimizer.zero_grad(set_to_none=True)
        for m in self._dropouts:
            m.rows = (first, len(y_batch))
        logits = self.module_(xb)
        weight_total = self._weight[y_batch].sum() if self._weight is not None else torch.tensor(float(len(y_batch)), device=self.device_)
        loss = self._criterion(logits, yb) / weight_total
        loss.backward()
        self._train_correct += (logits.detach().argmax(1) == yb).sum()  # train accuracy from the step's own logits (on device)
        loss = loss.detach().reshape(1)
        if self._world.enabled:
            params = [p for p in self.module_.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:  # a rank whose share of a tiny last batch is empty still adds its zeros
                    p.grad = torch.zeros_like(p)
            self._world.all_reduce_([p.grad for p in params] + [loss])
        self._optimizer.step()
        return float(loss) * len(y_batch)

    def evaluation_step(self, xb: torch.Tensor) -> torch.Tensor:
        self.module_.eval()
        with torch.inference_mode():
            return self.module_(xb)

    # -- fitting
    def fit(self, X, y, X_val=None, y_val=None) -> TorchHead:
        """Fit on ``X, y``; early-stop on ``X_val, y_val`` when given.

        Without them, ``val_fraction`` of the rows is held out (stratified) to find the
        best epoch count, then the head is refitted on all rows for that many epochs
        (``refit_full``), so no training data is wasted.
        """
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        classes = np.unique(y)
        n_val = math.ceil(self.val_fraction * len(X))
        if X_val is None and self.val_fraction > 0 and self.patience and len(X) >= 20 and n_val >= len(classes):
            from sklearn.model_selection import train_test_split

            strat = y if np.bincount(np.searchsorted(classes, y)).min() >= 2 else None
            Xa, Xb, ya, yb = train_test_split(X, y, test_size=n_val, random_state=self.random_state, stratify=strat)
            self.fit_source(ArraySource(Xa, ya), ArraySource(Xb, yb), classes=classes, n_features=X.shape[1])
            if not self.refit_full:
                return self
            holdout_history = self.history_
            best_epoch = int(np.argmin([h["val_loss"] for h in holdout_history])) + 1
            self.fit_source(ArraySource(X, y), None, classes=classes, n_features=X.shape[1], epochs=best_epoch)
            self.history_ = holdout_history
            return self
        val = None
        if X_val is not None:
            known = np.isin(y_val, classes)  # a class without training rows has no output to score (as LogRegHead and KNNHead)
            val = ArraySource(np.asarray(X_val, dtype=np.float32)[known], np.asarray(y_val)[known])
        return self.fit_source(ArraySource(X, y), val, classes=classes, n_features=X.shape[1])

    def fit_source(self, train: BatchSource, val: BatchSource | None, classes: np.ndarray, n_features: int,
                   train_labels: np.ndarray | None = None, epochs: int | None = None, world: World | None = None) -> TorchHead:
        """Train from any :class:`BatchSource` (the streaming path for big caches). Under
        torchrun (``world``) every rank runs the same steps on its share of each global batch,
        gradients summed over the ranks: one process's training, to float rounding."""
        self._world = world or World()
        torch.manual_seed(self.random_state)
        self._rng = np.random.default_rng(self.random_state)
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = n_features
        self.device_ = _device(self.device)
        self.module_ = self.initialize_module(n_features, len(self.classes_)).to(self.device_)
        self._dropouts = [m for m in self.module_.modules() if isinstance(m, BatchDropout)]
        mean, std = train.moments(self._world)
        std = np.where(std > 1e-12, std, 1.0)
        self.module_[0].mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.module_[0].scale.copy_(torch.as_tensor(std, dtype=torch.float32))
        weight = class_weight_vector(self.class_weight, self.classes_, train_labels if train_labels is not None else getattr(train, "y", None),
                                     self.device_)
        self._weight = weight
        self._criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=self.label_smoothing, reduction="sum")  # over the batch's weight: ``train_step``
        self._optimizer = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        epochs = self.epochs if epochs is None else epochs
        if self.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(self._optimizer, T_max=max(1, epochs))
        elif self.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(self._optimizer, step_size=max(1, epochs // 3), gamma=0.1)
        else:
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        self.history_: list[dict[str, float]] = []
        best, best_state, bad = math.inf, None, 0
        self._guard = None
        for epoch in range(epochs):
            t0 = time.perf_counter()
            total = self._train_epoch(train, epoch)
            correct = self._world.sum([float(self._train_correct)], self.device_)[0]
            row = {"epoch": epoch + 1, "train_loss": total / max(train.n_rows, 1), "train_accuracy": correct / max(train.n_rows, 1),
                   "lr": self._optimizer.param_groups[0]["lr"]}
            self._check_divergence(row["train_loss"], epoch)
            sched.step()
            if val is not None and val.n_rows:
                row["val_loss"], row["val_accuracy"] = self._score_source(val)
                if row["val_loss"] < best - 1e-6:
                    best, best_state, bad = row["val_loss"], copy.deepcopy(self.module_.state_dict()), 0
                else:
                    bad += 1
            row["seconds"] = time.perf_counter() - t0
            self.history_.append(row)
            if val is not None and self.patience and bad >= self.patience:
                break
        if best_state is not None:
            self.module_.load_state_dict(best_state)
        self.n_epochs_ = len(self.history_)
        self.module_.eval()
        for m in self._dropouts:
            m.rows = None
        del self._optimizer, self._criterion, self._rng, self._weight, self._guard, self._train_correct, self._world, self._dropouts
        return self

    def _train_epoch(self, train: BatchSource, epoch: int) -> float:
        """One pass over ``train``; the summed loss. A NaN/inf batch stops at once (no epoch of NaNs).
        ``_train_correct`` counts the rows each step's logits got right (no extra pass: the model
        as it was before each step, dropout on, as Keras' and Lightning's train accuracy)."""
        total = 0.0
        self._train_correct = torch.zeros((), dtype=torch.long, device=self.device_)
        for xb, yb, first, y_batch in self.get_batches(train, shuffle=True):
            loss = self.train_step(xb, yb, first, y_batch)
            if self._guard is None:  # the first batch's loss is computed before any update: the starting loss
                self._guard = DivergenceGuard.starting_at(loss / max(len(y_batch), 1), len(self.classes_))
            if not math.isfinite(loss):
                self._check_divergence(loss, epoch)
            total += loss
        return total

    def _check_divergence(self, loss: float, epoch: int) -> None:
        """Raise TrainingDivergedError when the (epoch's mean) training loss is NaN/inf or orders of magnitude over its start."""
        problem = self._guard.problem(loss) if self._guard is not None else None
        if problem:
            kind = "mlp" if self.hidden else "linear"
            raise TrainingDivergedError(f"training diverged: the {kind} head's training loss {problem} in epoch {epoch + 1}; "
                                        f"lower the learning rate: --lr is {self.lr:g} now, try 10x lower (job file: lr in the head's [[heads]] entry)")

    def _score_source(self, source: BatchSource) -> tuple[float, float]:
        """(loss, accuracy) on ``source``; the loss uses the training class weights, so
        early stopping watches the objective being optimised."""
        loss_fn = nn.CrossEntropyLoss(weight=self._weight, reduction="sum")
        total, norm, correct = 0.0, 0.0, 0
        for xb, yb, _, _ in self.get_batches(source, shuffle=False):  # under torchrun each rank scores its share; the sums are added
            logits = self.evaluation_step(xb)
            total += float(loss_fn(logits, yb))
            norm += float(self._weight[yb].sum()) if self._weight is not None else len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        total, norm, correct = self._world.sum([total, norm, correct], self.device_)
        return total / max(norm, 1e-12), correct / source.n_rows

    # -- inference
    def logits(self, X) -> np.ndarray:
        """Raw class scores [N, n_classes] (also for two classes)."""
        _check_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        outs = []
        for i in range(0, len(X), 8192):
            outs.append(self.evaluation_step(torch.as_tensor(X[i : i + 8192], device=self.device_)).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.empty((0, len(self.classes_)), dtype=np.float32)

    def decision_function(self, X) -> np.ndarray:
        """scikit-learn convention: [N, n_classes], or [N] (score of classes_[1]) for two classes."""
        z = self.logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        z = torch.as_tensor(self.logits(X), dtype=torch.float64)
        return torch.softmax(z, dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        scores = self.logits(X)
        return self.classes_[np.argmax(scores, axis=1)]

    # state for artifacts
    def get_state(self) -> dict[str, Any]:
        return {"classes": self.classes_, "n_features_in": self.n_features_in_,
                "state_dict": {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}}

    def set_state(self, state: dict[str, Any]) -> TorchHead:
        self.classes_ = np.asarray(state["classes"])
        self.n_features_in_ = int(state["n_features_in"])
        self.device_ = _device(self.device)
        self.module_ = self.initialize_module(self.n_features_in_, len(self.classes_))
        self.module_.load_state_dict(state["state_dict"])
        self.module_.to(self.device_).eval()
        self.history_ = []
        return self


class LinearHead(TorchHead):
    """Standardise + one linear layer (a linear probe) trained with AdamW.

    Smaller batches and a higher learning rate than the MLP: a linear probe has few
    parameters and needs more, larger steps (measured on the demo cache: matches logreg).
    """

    def __init__(self, hidden: tuple[int, ...] = (), dropout: tuple[float, ...] = (), lr: float = 3e-3,
                 weight_decay: float = 1e-4, epochs: int = 100, batch_size: int = 64, schedule: str = "cosine",
                 label_smoothing: float = 0.0, patience: int = 10, val_fraction: float = 0.1,
                 class_weight: str | None = None, refit_full: bool = True, device: str = "auto", random_state: int = 0):
        super().__init__(hidden, dropout, lr, weight_decay, epochs, batch_size, schedule, label_smoothing, patience,
                         val_fraction, class_weight, refit_full, device, random_state)


class MLPHead(TorchHead):
    """The classic transfer-learning MLP: 512 -> 256 with ReLU and dropout 0.25 / 0.5."""

    def __init__(self, hidden: tuple[int, ...] = (512, 256), dropout: tuple[float, ...] = (0.25, 0.5), lr: float = 1e-3,
                 weight_decay: float = 1e-4, epochs: int = 100, batch_size: int = 256, schedule: str = "cosine",
                 label_smoothing: float = 0.0, patience: int = 10, val_fraction: float = 0.1,
                 class_weight: str | None = None, refit_full: bool = True, device: str = "auto", random_state: int = 0):
        super().__init__(hidden, dropout, lr, weight_decay, epochs, batch_size, schedule, label_smoothing, patience,
                         val_fraction, class_weight, refit_full, device, random_state)


def make_head(kind: str, **params: Any) -> BaseEstimator:
    from ..errors import UsageError

    classes = {"logreg": LogRegHead, "linear": LinearHead, "mlp": MLPHead, "knn": KNNHead}
    if kind not in classes:
        raise UsageError(f"--clf {kind!r} is not a head; choose one of {', '.join(HEAD_KINDS)}")
    return classes[kind](**params)
