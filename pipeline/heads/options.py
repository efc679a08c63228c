"""Stage 2's options: the ``fit-head`` flags and a job file's ``[[heads]]`` keys (besides ``name``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..choices import CLASS_WEIGHTS, HEAD_KINDS, SELECT_ON, TORCH_SCHEDULES
from ..memory import budget_bytes, check_budget
from ..options import OUTSIDE_IDENTITY, check_types, choose, require


@dataclass(frozen=True)
class FitOptions:
    """Which head and how it is fitted. ``None`` means the head's own default (logreg: C by
    cross-validation; torch heads: their constructor defaults)."""

    clf: str = "logreg"
    C: float | None = None  # logreg: fixed C
    workers: int | None = field(default=None, metadata={OUTSIDE_IDENTITY: True})  # logreg: solver threads (None: torch's default, every core)
    epochs: int | None = None  # torch heads from here on
    lr: tuple[float, ...] | None = None  # several values (or weight decays, or architectures): a grid trained in one read
    weight_decay: tuple[float, ...] | None = None
    batch_size: int | None = None
    hidden: tuple[tuple[int, ...], ...] | None = None  # mlp only: one architecture or several
    dropout: tuple[float, ...] | None = None  # mlp only
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    patience: int | None = None
    class_weight: str | None = None
    val_fraction: float = 0.2  # validation share when the data is not pre-split
    seed: int = 0  # the split and the head
    stream: bool = False  # stream the cache in chunks (logreg: the same fit, summed over chunks; torch heads: minibatches)
    memory_budget: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})  # rows held in memory before streaming (pipeline/memory.py); a number is GiB
    k: tuple[int, ...] | None = None  # knn: neighbour counts; several are scored in one pass and the best on val kept (default 20)
    select_on: str = "cv"  # logreg: choose C by cross-validation on train, or on the cache's val split

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", check_budget(self.memory_budget))  # before the types: a number of GiB is accepted
        check_types(self)
        choose(self, "clf", HEAD_KINDS)
        choose(self, "class_weight", CLASS_WEIGHTS, "or leave it out for equal weights")
        require(self.C is None or self.C > 0, f"--C must be more than 0 (got {self.C})")
        require(self.workers is None or self.workers >= 1, f"--workers must be at least 1 (got {self.workers}); leave it out to use every core")
        require(self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})")
        require(self.lr is None or all(lr > 0 for lr in self.lr), f"--lr values must be more than 0 (got {self.lr})")
        require(self.weight_decay is None or all(wd >= 0 for wd in self.weight_decay), f"--weight-decay values must be 0 or more (got {self.weight_decay})")
        require(self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        require(self.hidden is None or all(h >= 1 for arch in self.hidden for h in arch), f"--hidden sizes must be at least 1 (got {self.hidden})")
        require(self.clf in ("linear", "mlp") or not self.is_grid(), f"--clf {self.clf}: lists of --lr/--weight-decay/--hidden are for the torch heads (linear, mlp)")
        require(self.dropout is None or all(0 <= d < 1 for d in self.dropout), f"--dropout values are fractions in [0, 1) (got {self.dropout})")
        require(0 <= self.label_smoothing < 1, f"--label-smoothing is a fraction in [0, 1) (got {self.label_smoothing})")
        choose(self, "schedule", TORCH_SCHEDULES)
        require(self.patience is None or self.patience >= 0, f"--patience must be 0 (off) or more (got {self.patience})")
        require(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        require(self.k is None or (len(self.k) > 0 and all(k >= 1 for k in self.k)), f"--k takes counts of at least 1, e.g. --k 10,20,100 (got {self.k})")
        choose(self, "select_on", SELECT_ON, "cv: folds of the training rows; val: the validation rows")

    @property
    def memory_budget_bytes(self) -> int:
        return budget_bytes(self.memory_budget)

    def estimator_params(self) -> dict[str, Any]:
        """The head estimator's constructor arguments (only those that were set)."""
        if self.clf == "logreg":
            return {"C": self.C, "n_jobs": self.workers, "random_state": self.seed, "class_weight": self.class_weight}
        if self.clf == "knn":
            return {"k": tuple(self.k) if self.k else 20, "random_state": self.seed}
        params: dict[str, Any] = {"random_state": self.seed, "class_weight": self.class_weight, "label_smoothing": self.label_smoothing,
                                  "schedule": self.schedule}
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        for name in ("lr", "weight_decay"):  # a grid's first value; fit_grid sets each member's
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)[0]
        if self.clf == "mlp":
            if self.hidden is not None:
                params["hidden"] = tuple(self.hidden[0])
            if self.dropout is not None:
                params["dropout"] = tuple(self.dropout)
        return params

    def is_grid(self) -> bool:
        """Several learning rates, weight decays or architectures: a grid of torch heads."""
        names = ("lr", "weight_decay") + (("hidden",) if self.clf == "mlp" else ())
        return any(len(getattr(self, name) or ()) > 1 for name in names)
