"""Many torch heads in one read: a grid of linear/MLP heads trained together, the best kept.

DINOv2's linear evaluation trains dozens of linear heads (learning rates x feature
variants) in one pass over the features and keeps the best on validation. Here every
member of a grid (learning rate x weight decay x architecture) is one slice of a stacked
module: heads of one architecture share one batched matmul, each batch is read once for
all of them (from memory or streamed from the cache), and a batched AdamW gives each
member its own learning rate and weight decay. Each member starts from exactly the
weights a separately trained head with the same seed would (same init, same batch order),
and stops early on its own validation loss.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..divergence import DivergenceGuard
from ..errors import TrainingDivergedError
from .common import head_device
from .estimators import BatchSource, TorchHead, build_head_module, class_weight_vector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    lr: float
    weight_decay: float
    hidden: tuple[int, ...]

    def name(self) -> str:
        arch = "-".join(map(str, self.hidden)) or "linear"
        return f"{arch} lr={self.lr:g} wd={self.weight_decay:g}"


def grid_members(lrs: tuple[float, ...], weight_decays: tuple[float, ...], hiddens: tuple[tuple[int, ...], ...]) -> list[Member]:
    return [Member(lr, wd, tuple(h)) for h, lr, wd in itertools.product(hiddens, lrs, weight_decays)]


class StackedHeads(nn.Module):
    """G heads of one architecture: Standardize (shared) -> [Linear -> ReLU -> Dropout]* -> Linear,
    each Linear a [G, out, in] weight used through one batched matmul."""

    def __init__(self, template: nn.Sequential, members: int, dropouts: tuple[float, ...]):
        super().__init__()
        self.standardize = template[0]
        linears = [m for m in template if isinstance(m, nn.Linear)]
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(members, l.out_features, l.in_features)) for l in linears])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(members, l.out_features)) for l in linears])
        self.dropouts = dropouts

    def load_member(self, g: int, module: nn.Sequential) -> None:
        linears = [m for m in module if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for w, b, lin in zip(self.weights, self.biases, linears):
                w[g].copy_(lin.weight)
                b[g].copy_(lin.bias)

    def member_state(self, g: int, module: nn.Sequential) -> nn.Sequential:
        linears = [m for m in module if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for w, b, lin in zip(self.weights, self.biases, linears):
                lin.weight.copy_(w[g])
                lin.bias.copy_(b[g])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [G, n, classes]."""
        x = self.standardize(x)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            G, out, _ = w.shape
            if i == 0:  # every member reads the same rows: one [n, D] x [D, G*out] matmul
                h = (x @ w.reshape(G * out, -1).T).view(len(x), G, out).transpose(0, 1) + b.unsqueeze(1)
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < last:
                h = F.relu(h)
                p = self.dropouts[i] if i < len(self.dropouts) else (self.dropouts[-1] if self.dropouts else 0.0)
                if self.training and p > 0:
                    h = F.dropout(h, p)
        return h


class BatchedAdamW:
    """torch.optim.AdamW's update (default betas and eps), with a learning rate and weight
    decay per member (the leading dimension of every parameter)."""

    def __init__(self, params: list[nn.Parameter], lr: torch.Tensor, weight_decay: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, factor: float, active: torch.Tensor) -> None:
        """One update; ``factor`` scales every learning rate (the schedule); members whose
        ``active`` is False stay as they are."""
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr = (self.lr * factor * active).view(shape).to(p.dtype)
            p.mul_(1 - lr * self.wd.view(shape))
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
            p.sub_(lr / (1 - b1**self.t) * (m / denom))


def _schedule_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier torch's CosineAnnealingLR / StepLR(epochs // 3, 0.1) give at ``epoch``."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    return 0.1 ** (epoch // max(1, epochs // 3))


def _member_losses(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    """[G] mean cross-entropy of each member's [n, classes] logits (one call when unweighted)."""
    if weight is None:
        G, n, k = logits.shape
        ce = F.cross_entropy(logits.reshape(G * n, k), y.repeat(G), label_smoothing=label_smoothing, reduction="none")
        return ce.view(G, n).mean(1)
    return torch.stack([F.cross_entropy(z, y, weight=weight, label_smoothing=label_smoothing) for z in logits])


NONFINITE_CHECK_EVERY = 16  # batches between looks for NaN/inf member losses (each look waits for the device)


class GridDivergence:
    """Which members diverged, and how. A diverged member stops training and ranks last; its
    siblings go on. Only when every member has diverged is it an error."""

    def __init__(self, members: list[Member], groups: dict[tuple[int, ...], list[int]], n_classes: int):
        self.members, self.groups, self.n_classes = members, groups, n_classes
        self.guards: dict[int, DivergenceGuard] = {}
        self.why: dict[int, str] = {}

    def start(self, first: dict[tuple[int, ...], torch.Tensor]) -> None:
        """Each member's loss on the first batch (before any update) is its starting loss."""
        for hidden, losses in first.items():
            for i, loss in zip(self.groups[hidden], losses.tolist()):
                self.guards[i] = DivergenceGuard.starting_at(loss, self.n_classes)

    def check(self, sums: dict[tuple[int, ...], torch.Tensor], rows: int, epoch: int, active: dict[tuple[int, ...], torch.Tensor],
              nonfinite_only: bool = False) -> None:
        """Drop members whose mean loss so far (``sums`` / ``rows``) diverged (``nonfinite_only``: is NaN/inf)."""
        for hidden, total in sums.items():
            for g, (i, value) in enumerate(zip(self.groups[hidden], (total / max(rows, 1)).tolist())):
                if i in self.why or i not in self.guards or (nonfinite_only and math.isfinite(value)):
                    continue
                if problem := self.guards[i].problem(value):
                    self.why[i] = f"training loss {problem} in epoch {epoch + 1}"
                    active[hidden][g] = 0.0
        if len(self.why) == len(self.members):
            raise TrainingDivergedError(f"training diverged: every head of the grid diverged ({self._listing()}); "
                                        f"lower the learning rates: --lr is {self._lrs(self.members)} now, try 10x lower "
                                        "(job file: lr in the head's [[heads]] entry)")

    def warn(self) -> None:
        if self.why:
            logger.warning(f"grid: {len(self.why)} of {len(self.members)} heads diverged and were dropped ({self._listing()}); the best of the others "
                           f"is kept; leave out learning rates as high as {self._lrs([self.members[i] for i in self.why])} (--lr)")

    def _listing(self) -> str:
        return "; ".join(f"{self.members[i].name()}: {why}" for i, why in sorted(self.why.items()))

    @staticmethod
    def _lrs(members: list[Member]) -> str:
        return ",".join(f"{lr:g}" for lr in dict.fromkeys(m.lr for m in members))


def fit_grid(template: TorchHead, members: list[Member], train: BatchSource, val: BatchSource, classes: np.ndarray, n_features: int,
             train_labels: np.ndarray | None = None) -> tuple[TorchHead, list[dict[str, Any]]]:
    """Train every member on one read of ``train`` per epoch; return the member with the
    lowest validation loss as a fitted ``TorchHead`` (params of ``template`` with its lr,
    weight decay and hidden sizes) and the leaderboard of all of them (best first)."""
    from sklearn.base import clone

    heads = [clone(template).set_params(lr=m.lr, weight_decay=m.weight_decay, hidden=m.hidden) for m in members]
    device = head_device(template.device)
    classes = np.asarray(classes)
    mean, std = train.moments()
    std = np.where(std > 1e-12, std, 1.0)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.hidden, []).append(i)
    stacks: dict[tuple[int, ...], StackedHeads] = {}
    for hidden, idx in groups.items():
        modules = []
        for i in idx:  # the init a separately trained head gets: seeded, then built
            torch.manual_seed(heads[i].random_state)
            modules.append(heads[i].initialize_module(n_features, len(classes)))
        stack = StackedHeads(modules[0], len(idx), tuple(heads[idx[0]].dropout))
        stack.standardize.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        stack.standardize.scale.copy_(torch.as_tensor(std, dtype=torch.float32))
        for g, module in enumerate(modules):
            stack.load_member(g, module)
        stacks[hidden] = stack.to(device)
    weight = class_weight_vector(template.class_weight, classes, train_labels if train_labels is not None else getattr(train, "y", None), device)
    optimizers = {h: BatchedAdamW(list(s.parameters()), torch.tensor([members[i].lr for i in groups[h]], device=device),
                                  torch.tensor([members[i].weight_decay for i in groups[h]], device=device)) for h, s in stacks.items()}
    active = {h: torch.ones(len(groups[h]), device=device) for h in stacks}
    best = {i: (math.inf, None, 0) for i in range(len(members))}  # val loss, state, epochs without improvement
    history: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(members))}
    rng = np.random.default_rng(template.random_state)
    epochs, t_start = template.epochs, time.perf_counter()
    diverged = GridDivergence(members, groups, len(classes))
    to_tensors = lambda X, y: (torch.as_tensor(np.asarray(X, dtype=np.float32), device=device),  # noqa: E731
                               torch.as_tensor(np.searchsorted(classes, y), dtype=torch.long, device=device))
    for epoch in range(epochs):
        factor = _schedule_factor(template.schedule, epoch, epochs)
        sums = {h: torch.zeros(len(groups[h]), dtype=torch.float64, device=device) for h in stacks}
        correct = {h: torch.zeros(len(groups[h]), dtype=torch.long, device=device) for h in stacks}  # train accuracy from the steps' own logits
        for s in stacks.values():
            s.train()
        seen = 0
        for b, (X, y) in enumerate(train.batches(template.batch_size, True, rng)):  # one read for every member
            xb, yb = to_tensors(X, y)
            first = {}
            for hidden, stack in stacks.items():
                logits = stack(xb)
                losses = _member_losses(logits, yb, weight, template.label_smoothing)
                correct[hidden] += (logits.detach().argmax(-1) == yb).sum(-1)
                first[hidden] = losses.detach()
                optimizers[hidden].zero_grad()
                losses.sum().backward()
                optimizers[hidden].step(factor, active[hidden])
                sums[hidden] += losses.detach().double() * len(xb)
            seen += len(xb)
            if not diverged.guards:
                diverged.start(first)
            if (b + 1) % NONFINITE_CHECK_EVERY == 0:  # a NaN member stops now, not after an epoch of NaNs
                diverged.check(sums, seen, epoch, active, nonfinite_only=True)
        diverged.check(sums, train.n_rows, epoch, active)
        totals = {i: float(sums[h][g]) for h in stacks for g, i in enumerate(groups[h])}
        right = {i: int(correct[h][g]) for h in stacks for g, i in enumerate(groups[h])}
        val_loss, val_correct, norm = ({i: 0.0 for i in totals} for _ in range(3))
        for s in stacks.values():
            s.eval()
        with torch.inference_mode():
            for X, y in val.batches(8192, False, rng):
                xb, yb = to_tensors(X, y)
                for hidden, stack in stacks.items():
                    logits = stack(xb)
                    for g, i in enumerate(groups[hidden]):
                        val_loss[i] += float(F.cross_entropy(logits[g], yb, weight=weight, reduction="sum"))
                        val_correct[i] += int((logits[g].argmax(1) == yb).sum())
                        norm[i] += float(weight[yb].sum()) if weight is not None else len(yb)
        for hidden, stack in stacks.items():
            for g, i in enumerate(groups[hidden]):
                if not bool(active[hidden][g]):
                    continue
                loss = val_loss[i] / max(norm[i], 1e-12)
                history[i].append({"epoch": epoch + 1, "train_loss": totals[i] / max(train.n_rows, 1),
                                   "train_accuracy": right[i] / max(train.n_rows, 1), "lr": members[i].lr * factor,
                                   "val_loss": loss, "val_accuracy": val_correct[i] / max(val.n_rows, 1)})
                best_loss, state, bad = best[i]
                if loss < best_loss - 1e-6:
                    best[i] = (loss, [p[g].detach().clone() for p in stack.parameters()], 0)
                else:
                    best[i] = (best_loss, state, bad + 1)
                    if template.patience and bad + 1 >= template.patience:
                        active[hidden][g] = 0.0
        if not any(bool(a.any()) for a in active.values()):
            break
    diverged.warn()
    board = []
    for i, m in enumerate(members):
        loss, state, _ = best[i]
        last = min(history[i], key=lambda r: r["val_loss"]) if history[i] else {}
        board.append({"name": m.name(), "lr": m.lr, "weight_decay": m.weight_decay, "hidden": list(m.hidden),
                      "val_loss": None if i in diverged.why else loss, "val_accuracy": last.get("val_accuracy"), "best_epoch": last.get("epoch"),
                      "epochs": len(history[i]), "diverged": diverged.why.get(i)})
    order = sorted(range(len(members)), key=lambda i: (i in diverged.why, board[i]["val_loss"] or 0.0, i))
    winner = order[0]
    head, stack = heads[winner], stacks[members[winner].hidden]
    g = groups[members[winner].hidden].index(winner)
    with torch.no_grad():  # the winner's best epoch into the stack slice, then into a plain module
        for p, saved in zip(stack.parameters(), best[winner][1] or [p[g].detach().clone() for p in stack.parameters()]):
            p[g].copy_(saved)
    head.classes_, head.n_features_in_, head.device_ = classes, n_features, device
    module = build_head_module(n_features, len(classes), members[winner].hidden, tuple(head.dropout)).to(device)
    module[0].load_state_dict(stack.standardize.state_dict())
    head.module_ = stack.member_state(g, module).eval()
    head.history_, head.n_epochs_ = history[winner], len(history[winner])
    seconds = round(time.perf_counter() - t_start, 3)
    return head, [{**board[i], "rank": r + 1, "grid_seconds": seconds} for r, i in enumerate(order)]
