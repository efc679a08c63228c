"""One optimisation loop: parameter groups (no weight decay on biases and norms), the
learning-rate schedule as a pure function of progress (so resume needs no scheduler
state), accumulation, clipping, AMP, DDP, and the RNG state a checkpoint carries."""
from __future__ import annotations

import hashlib
import inspect
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..backbones import PrecisionChoice, TorchEngine, choose_precision
from ..distributed import World
from ..divergence import DivergenceGuard
from ..errors import TrainingDivergedError
from ..inference import ScoringModule
from .model import FineTuneModel
from .options import FinetuneOptions

INCEPTION_AUX_WEIGHT = 0.4  # loss = main + 0.4 * aux (torchvision's reference recipe)
DIVERGENCE_CHECK_EVERY = 20  # batches between looks at the epoch's mean loss so far (NaN/inf batches stop at once)


def param_groups(model: FineTuneModel, opts: FinetuneOptions) -> list[dict[str, Any]]:
    """Backbone and head at their own learning rates; no weight decay on biases and norms."""
    head_params = {id(p) for p in model.head.parameters()}
    aux = getattr(model.backbone, "AuxLogits", None)
    if aux is not None:
        head_params |= {id(p) for p in aux.parameters()}
    groups = []
    for part, lr in (("backbone", opts.lr_backbone), ("head", opts.lr_head)):
        params = [p for p in model.parameters() if p.requires_grad and ((id(p) in head_params) == (part == "head"))]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "initial_lr": lr, "weight_decay": opts.weight_decay if decay else 0.0, "name": part})
    return groups


def make_optimizer(groups: list[dict[str, Any]], opts: FinetuneOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr_head, momentum=opts.momentum, nesterov=opts.momentum > 0)
    return torch.optim.AdamW(groups, lr=opts.lr_head)


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base learning rates at optimiser step ``step`` of ``total``."""
    warm = round(warmup * total)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":  # x0.1 after each third of training
        return 0.1 ** min(2, int(t * 3))
    return 1.0


# ----------------------------------------------------------------------------- training


@dataclass
class EpochStats:
    loss_sum: float  # summed over images (so ranks can add them up)
    correct: int
    images: int
    seconds: float
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)



def training_precision(opts: FinetuneOptions, device: torch.device) -> PrecisionChoice:
    """What the forward and backward passes run in. ``--amp``: CUDA mixed precision, bf16 where
    supported, else fp16. ``--precision``: as extraction chooses (bf16 only where the hardware
    runs it natively: AMX or AVX-512 BF16 CPUs, CUDA >= 8.0), except that ``auto`` on an older
    GPU trains in fp16 with loss scaling. Weights, gradients and optimiser state stay fp32."""
    if opts.amp:
        bf16 = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if bf16 else "fp16", torch.bfloat16 if bf16 else torch.float16, "")
    chosen = choose_precision(opts.precision or "fp32", device)
    if opts.precision == "auto" and device.type == "cuda" and chosen.name == "fp32":
        return PrecisionChoice("fp16", torch.float16, "precision auto -> fp16 with loss scaling: this GPU has no native bf16")
    return chosen

class Trainer:
    """One optimisation loop: forward, (aux) loss, accumulation, clipping, AMP, LR schedule."""

    def __init__(self, model: FineTuneModel, opts: FinetuneOptions, device: torch.device, labels: np.ndarray, team: World | None = None,
                 input_size: int = 224):
        """``labels[i]`` is the class of the training set's item ``i``. With a torchrun
        ``team`` the model is wrapped in DistributedDataParallel (gradients averaged)."""
        self.module, self.opts, self.device, self.input_size = model, opts, device, input_size
        self.team = team or World()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.optimizer = make_optimizer(param_groups(model, opts), opts)
        self.model: nn.Module = model
        if self.team.enabled:  # BatchNorm is frozen (eval mode), so no SyncBatchNorm is needed
            # frozen BatchNorm buffers never change: no need to re-broadcast them every forward
            quiet_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **{quiet_buffers: False})
        self.precision = training_precision(opts, device)
        self.amp_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)  # fp16's narrow range needs loss scaling; bf16's does not
        self.criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.guard: DivergenceGuard | None = None  # set by the first batch: its loss is where training started
        self._running = [0.0, 0]  # loss summed over this epoch's images so far, and their count

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.opts.channels_last else x

    def train_epoch(self, loader, epoch: int, total_epochs: int, progress: Callable[[int, int, float], None] | None = None) -> EpochStats:
        """One pass; the learning rate follows ``lr_factor`` of global optimiser steps."""
        self.model.train()
        accum = self.opts.accum
        n_batches = len(loader)
        steps_per_epoch = math.ceil(n_batches / accum)
        total_steps = steps_per_epoch * total_epochs
        t0 = time.perf_counter()
        loss_sum, correct, seen, failures = 0.0, 0, 0, []
        self._running = [0.0, 0]
        self.optimizer.zero_grad(set_to_none=True)
        for b, batch in enumerate(loader):
            failures += batch.failures
            group_start = (b // accum) * accum
            group_size = min(accum, n_batches - group_start)
            last_of_group = b + 1 == group_start + group_size
            if batch.images is not None or self.team.enabled:
                # under DDP a rank whose whole batch failed to decode still joins the gradient
                # all-reduce (with a zero-weight forward), or the other ranks would wait forever
                sync = self.model.no_sync() if self.team.enabled and not last_of_group else nullcontext()
                with sync:
                    value, hits, n = self._forward_backward(batch, group_size, epoch, b)
                loss_sum, correct, seen = loss_sum + value * n, correct + hits, seen + n
            if last_of_group:
                self._step(epoch * steps_per_epoch + b // accum, total_steps)
            if progress:
                progress(b + 1, n_batches, time.perf_counter() - t0)
        return EpochStats(loss_sum, correct, seen, time.perf_counter() - t0, failures)

    def _forward_backward(self, batch, group_size: int, epoch: int, b: int) -> tuple[float, int, int]:
        """Loss (+0.4 x inception aux loss) and its backward; returns (mean loss, correct, images)."""
        if batch.images is None:
            size = self.input_size
            x, y = torch.zeros(1, 3, size, size, device=self.device), None
        else:
            x = self._to_device(batch.images)
            y = self.labels[batch.positions].to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model(x)
            logits = out[0] if isinstance(out, tuple) else out
            if y is None:
                loss = logits.float().sum() * 0.0 + (out[1].float().sum() * 0.0 if isinstance(out, tuple) else 0.0)
            elif isinstance(out, tuple):
                loss = self.criterion(logits, y) + INCEPTION_AUX_WEIGHT * self.criterion(out[1], y)
            else:
                loss = self.criterion(logits, y)
        value = float(loss.detach())
        self._watch(value, 0 if y is None else len(y), epoch, b)
        self.scaler.scale(loss / group_size).backward()
        if y is None:
            return 0.0, 0, 0
        return value, int((logits.detach().argmax(1) == y).sum()), len(y)

    def _watch(self, value: float, n: int, epoch: int, b: int) -> None:
        """Raise TrainingDivergedError at a NaN/inf batch loss, or when the epoch's mean loss so far is over
        the divergence limit (looked at every DIVERGENCE_CHECK_EVERY batches), before the step that would apply it."""
        if n:
            if self.guard is None:
                self.guard = DivergenceGuard.starting_at(value, self.n_classes)
            self._running[0] += value * n
            self._running[1] += n
        problem = None
        if not math.isfinite(value):
            problem = f"the training loss became {value} in epoch {epoch + 1}, batch {b + 1}"
        elif self.guard is not None and (b + 1) % DIVERGENCE_CHECK_EVERY == 0 and (grew := self.guard.problem(self._running[0] / max(self._running[1], 1))):
            problem = f"the mean training loss of epoch {epoch + 1} so far {grew} by batch {b + 1}"
        self._stop_if(problem, f"epoch {epoch + 1}, batch {b + 1}")

    def check_epoch(self, mean_loss: float, epoch: int) -> None:
        """After an epoch (``mean_loss`` over every rank's images), before anything is saved: raise
        TrainingDivergedError when the mean loss diverged or a trained weight is NaN/inf."""
        problem = None
        if self.guard is not None and (grew := self.guard.problem(mean_loss)):
            problem = f"the mean training loss of epoch {epoch + 1} {grew}"
        elif not all(bool(torch.isfinite(p).all()) for p in self.trainable):
            problem = f"epoch {epoch + 1} left NaN/inf weights"
        self._stop_if(problem, f"epoch {epoch + 1}")

    def _stop_if(self, problem: str | None, where: str) -> None:
        """Raise for ``problem``; under DDP every rank raises when any rank has one (a lone raise would leave the others waiting)."""
        if self.team.enabled and self.team.sum([1.0 if problem else 0.0], self.device)[0] > 0:
            problem = problem or f"the training loss diverged on another rank in {where}"
        if problem:
            raise TrainingDivergedError(f"training diverged: {problem}; {self.lower_lr_advice()}")

    def lower_lr_advice(self) -> str:
        """What to change: the learning rates by name and value (command line and job file)."""
        o = self.opts
        clip = ", or set --clip-grad (e.g. 1.0)" if not o.clip_grad else ""
        return (f"lower --lr-backbone/--lr-head (now {o.lr_backbone:g}/{o.lr_head:g}; job file: lr_backbone/lr_head in [finetune]), "
                f"e.g. 10x{clip}")

    def _step(self, step: int, total_steps: int) -> None:
        factor = lr_factor(step, total_steps, self.opts.schedule, self.opts.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        if self.opts.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.opts.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def scoring_engine(self) -> TorchEngine:
        """The model in eval mode as an engine of the one inference path (``inference.py``):
        class probabilities as its rows, in the training's precision."""
        self.module.eval()
        return TorchEngine("eager", ScoringModule(self.module), self.precision, self.device, self.opts.channels_last, self.opts.batch_size)

    @property
    def n_classes(self) -> int:
        return self.module.head[-1].out_features


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state_dict (key order, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
