"""Stage 3's options: the ``finetune`` flags and a job file's ``[finetune]`` keys (besides ``from_head``).

An option left out (None) means its default, or on ``--resume`` what the checkpoint used;
a value that differs from the checkpoint is refused, except the ones in
``RESUME_MAY_CHANGE``. The training options of a resolved run are stored in its
checkpoint and compared on resume; the "how" options (workers, device) never are.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..choices import AUGMENT_PRESETS, HEAD_MODES, OPTIMIZERS, PRECISIONS, SCHEDULES
from ..errors import UsageError
from ..options import JOB_LEVEL, OUTSIDE_IDENTITY, build, check_device, check_types, choose, fields_outside_identity, flag, require
from .freezing import parse_unfreeze

OPTIMIZER_DEFAULTS = {
    "sgd": {"lr_backbone": 1e-3, "lr_head": 1e-2, "weight_decay": 1e-4},
    "adamw": {"lr_backbone": 1e-5, "lr_head": 1e-3, "weight_decay": 0.05},
}
# Options that may change on --resume (more epochs; how the work is run, not what it computes).
RESUME_MAY_CHANGE = ("epochs",)


@dataclass(frozen=True)
class FinetuneOptions:
    """How the backbone + head are trained end to end. Every training field is None until
    :meth:`resolve` fills it from :data:`DEFAULTS` (and the checkpoint, on resume)."""

    head: str | None = None  # "from": start from the artifact's head; "new": fresh layer (same standardisation)
    unfreeze: str | None = None  # all | last:N
    augment: str | None = None
    optimizer: str | None = None
    lr_backbone: float | None = None  # per optimizer (OPTIMIZER_DEFAULTS)
    lr_head: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup: float | None = None  # fraction of all optimiser steps spent in linear warmup
    epochs: int | None = None
    batch_size: int | None = None
    accum: int | None = None
    clip_grad: float | None = None  # max gradient norm (0 = off): the first steps through a standardised probe can explode without it
    label_smoothing: float | None = None
    amp: bool | None = None  # CUDA mixed precision: bf16 where supported, else fp16 (kept; --precision says more)
    precision: str | None = None  # fp32, bf16 (where native), fp16 (CUDA), auto: bf16 where native, fp16 on older GPUs, else fp32
    channels_last: bool | None = None
    seed: int | None = None
    workers: int | None = field(default=None, metadata={OUTSIDE_IDENTITY: True})  # decoder processes (None: sized to the machine)
    device: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True, JOB_LEVEL: True})

    def __post_init__(self) -> None:
        check_types(self)
        choose(self, "head", HEAD_MODES, "from: the artifact's head; new: a fresh linear layer")
        for name, choices in (("augment", AUGMENT_PRESETS), ("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("precision", PRECISIONS)):
            choose(self, name, choices)
        if self.unfreeze is not None:
            object.__setattr__(self, "unfreeze", self.unfreeze.strip().lower())
            parse_unfreeze(self.unfreeze)
        if self.amp and self.precision is not None:
            raise UsageError("--amp and --precision were both given: --amp is CUDA mixed precision (bf16 where supported, else fp16); give one of them")
        given = self.given()
        at_least = {"epochs": 0, "batch_size": 1, "accum": 1, "lr_backbone": 0.0, "weight_decay": 0.0, "clip_grad": 0.0}
        for name, low in at_least.items():
            if name in given:
                require(given[name] >= low, f"{flag(name)} must be {low} or more (got {given[name]})")
        for name in ("warmup", "momentum", "label_smoothing"):
            if name in given:
                require(0.0 <= given[name] < 1.0, f"{flag(name)} is a fraction in [0, 1) (got {given[name]})")
        if "lr_head" in given:
            require(self.lr_head > 0, f"--lr-head must be more than 0 (got {self.lr_head})")
        require(self.workers is None or self.workers >= 0, f"--workers must be 0 or more (got {self.workers})")
        check_device(self)

    def given(self) -> dict[str, Any]:
        """The training options that were set (not None)."""
        return {k: v for k, v in self.training().items() if v is not None}

    def training(self) -> dict[str, Any]:
        """What the run computes: every option but the "how" ones; stored in checkpoints."""
        skip = fields_outside_identity(type(self))
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def resolve(self, previous: Mapping[str, Any] | None = None) -> FinetuneOptions:
        """Defaults <- the checkpoint's options (on resume) <- the options given now."""
        given = self.given()
        if previous is not None:
            for key, value in given.items():
                if key not in RESUME_MAY_CHANGE and previous.get(key) != value:
                    raise UsageError(f"{flag(key)} {value!r} differs from the checkpoint's {previous.get(key)!r}; "
                                     "resume with the same options, or start over with --force")
        known = set(DEFAULTS)
        merged = {**DEFAULTS, **{k: v for k, v in (previous or {}).items() if k in known and v is not None}, **given}
        for key, value in OPTIMIZER_DEFAULTS[merged["optimizer"]].items():
            if merged[key] is None:
                merged[key] = value
        return dataclasses.replace(self, **merged)


# The default of every training option (None: chosen per optimizer, OPTIMIZER_DEFAULTS).
DEFAULTS: dict[str, Any] = {
    "head": "from", "unfreeze": "all", "augment": "basic", "optimizer": "sgd", "lr_backbone": None, "lr_head": None, "momentum": 0.9,
    "weight_decay": None, "schedule": "cosine", "warmup": 0.1, "epochs": 10, "batch_size": 32, "accum": 1, "clip_grad": 1.0,
    "label_smoothing": 0.0, "amp": False, "precision": None, "channels_last": True, "seed": 0,
}


def resolve_options(given: FinetuneOptions | Mapping[str, Any] | None = None, previous: Mapping[str, Any] | None = None) -> FinetuneOptions:
    """The options a run uses: ``given`` (an options object or a mapping of field values,
    None = left out) resolved against the defaults and, on resume, the checkpoint's options."""
    return build(FinetuneOptions, given).resolve(previous)
