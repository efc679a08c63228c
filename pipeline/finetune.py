"""Stage 3: the stage-2 head bolted onto its backbone, trained end to end, BatchNorm frozen.

The "linear probe, then fine-tune" recipe: a head artifact names its backbone (model,
weights, preprocessing), its classes and its train/val split; we rebuild that backbone,
attach the head (logreg becomes the equivalent standardise + linear layer), thaw the
chosen blocks and train on the image folder with augmentation — never on the head's
validation images. Every epoch ends with an atomic checkpoint (model, optimiser, grad
scaler, RNG, history); ``resume`` continues bit-for-bit. The best epoch by validation
accuracy is the output: a model artifact that ``predict``, ``evaluate`` and
``extract --model PATH`` accept.

The learning rate is a pure function of training progress (warmup, then cosine or
step), so a resumed run needs no scheduler object and stays exact.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sklearn
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from . import __version__
from .artifacts import LoadedHead, artifact_id, load_head, save_model_artifact
from .atomic import atomic_path
from .backbones import AUX_CLASSIFIERS, Backbone, Preprocessing, drop_aux_classifiers, torch_load_quietly
from .data import ImageRecord, scan_folder
from .errors import CacheError, DataError, IncompatibleError, Interrupted, TrainingDiverged, UsageError
from .extract import resolve_device
from .reader import ImageFileDataset, default_workers, make_loader
from .freezing import freeze_batchnorm, keep_frozen_in_eval, unfreeze
from .heads import LogRegHead, TorchHead, build_head_module
from .distributed import World, rank_device, world
from .interrupts import sigterm_as_interrupt
from .locks import WriterLock
from .metrics import classification_metrics, write_reports
from .splits import assign_splits

CHECKPOINT_FORMAT = "featcache.checkpoint"
CHECKPOINT_SCHEMA = 1
AUGMENT_PRESETS = ("none", "light", "basic", "rotate", "strong")
INCEPTION_AUX_WEIGHT = 0.4  # loss = main + 0.4 * aux (torchvision's reference recipe)

# Training options and their defaults. None on the command line means "default", or on
# --resume "what the checkpoint used"; a value that differs from the checkpoint is refused.
DEFAULTS: dict[str, Any] = {
    "head": "from",  # "from": start from the artifact's head; "new": fresh layer (same standardisation)
    "unfreeze": "all",
    "augment": "basic",
    "optimizer": "sgd",
    "lr_backbone": None,  # per optimizer, below
    "lr_head": None,
    "momentum": 0.9,
    "weight_decay": None,
    "schedule": "cosine",
    "warmup": 0.1,  # fraction of all optimiser steps spent in linear warmup
    "epochs": 10,
    "batch_size": 32,
    "accum": 1,
    "clip_grad": 1.0,  # max gradient norm (0 = off): the first steps through a standardised probe can explode without it
    "label_smoothing": 0.0,
    "amp": False,
    "channels_last": True,
    "seed": 0,
}
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr_backbone": 1e-3, "lr_head": 1e-2, "weight_decay": 1e-4},
    "adamw": {"lr_backbone": 1e-5, "lr_head": 1e-3, "weight_decay": 0.05},
}
# Options that may change on --resume (more epochs; how the work is run, not what it computes).
RESUME_MAY_CHANGE = ("epochs",)


def resolve_options(given: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- checkpoint's options (on resume) <- options given now; validated."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"unknown fine-tune option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in given.items() if v is not None}
    if previous is not None:
        for key, value in given.items():
            if key not in RESUME_MAY_CHANGE and previous.get(key) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} {value!r} differs from the checkpoint's {previous.get(key)!r}; resume with the same options, or start over with --force")
    opts = {**DEFAULTS, **(previous or {}), **given}
    if opts["optimizer"] not in OPTIMIZER_DEFAULTS:
        raise UsageError(f"--optimizer {opts['optimizer']!r}: choose sgd or adamw")
    for key, value in OPTIMIZER_DEFAULTS[opts["optimizer"]].items():
        if opts[key] is None:
            opts[key] = value
    checks = [
        (opts["head"] in ("from", "new"), "--head must be 'from' (the artifact's head) or 'new'"),
        (opts["augment"] in AUGMENT_PRESETS, f"--augment must be one of {', '.join(AUGMENT_PRESETS)}"),
        (opts["schedule"] in ("cosine", "step", "constant"), "--schedule must be cosine, step or constant"),
        (opts["epochs"] >= 0, "--epochs must be 0 or more"),
        (opts["batch_size"] >= 1, "--batch-size must be at least 1"),
        (opts["accum"] >= 1, "--accum must be at least 1"),
        (0.0 <= opts["warmup"] < 1.0, "--warmup is a fraction of training in [0, 1)"),
        (opts["lr_backbone"] >= 0 and opts["lr_head"] > 0, "--lr-backbone must be >= 0 and --lr-head > 0"),
        (opts["clip_grad"] >= 0, "--clip-grad must be 0 (off) or a positive norm"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return opts


# ----------------------------------------------------------------------------- data


def train_transform(pre: Preprocessing, preset: str) -> Callable:
    """Augmentation at the model's own input size and normalisation (from its weights)."""
    if preset == "none":
        return pre.transform()
    interpolation = InterpolationMode(pre.interpolation)
    if preset == "light":  # no flip, no tiny crops: for digits, text and other orientation-bound images
        ops: list[Any] = [T.RandomResizedCrop(pre.input_size, scale=(0.5, 1.0), interpolation=interpolation, antialias=True)]
    else:
        ops = [T.RandomResizedCrop(pre.input_size, interpolation=interpolation, antialias=True), T.RandomHorizontalFlip()]
    if preset == "rotate":
        ops.append(T.RandomRotation(15, interpolation=InterpolationMode.BILINEAR))
    elif preset == "strong":
        ops.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    return T.Compose([*ops, T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Normalize(pre.mean, pre.std)])


class AugmentedDataset(ImageFileDataset):
    """Each image's augmentation is seeded by (seed, epoch, index): identical whatever the
    number of workers, and again after a resume."""

    def __init__(self, root: Path, records: list[ImageRecord], transform: Callable, seed: int):
        super().__init__(root, records, transform, hash_files=False)
        self.seed, self.epoch = seed, 0

    def preprocess(self, i: int, image) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
            return self.transform(image)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's items for one epoch, exactly as torch's ``DistributedSampler`` (shuffled by
    seed + epoch via ``set_epoch``, padded to equal shares) deals them — one rule for any
    number of ranks, so 2 ranks x batch B see the same images per step as 1 rank x batch 2B."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


# ----------------------------------------------------------------------------- model


class FineTuneModel(nn.Module):
    """Headless backbone -> stage-2 head module (``Standardize`` first, as fitted on the cache).

    ``train()`` keeps every BatchNorm layer and every frozen block in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_in_eval: list[nn.Module] = []

    def forward(self, x: torch.Tensor):
        out = self.backbone(x)
        aux = None
        if isinstance(out, tuple):  # inception_v3 in training mode: (features, aux logits)
            out, aux = out[0], out[1]
        logits = self.head(torch.flatten(out, 1))
        return (logits, aux) if aux is not None and self.training else logits

    def train(self, mode: bool = True) -> "FineTuneModel":
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.frozen_in_eval)
        return self


def head_module_from(loaded: LoadedHead, n_classes: int, fresh: bool, seed: int) -> tuple[str, dict[str, Any], nn.Sequential]:
    """(kind, params, module) to attach: the artifact's head as a torch module, or a fresh
    linear layer that keeps the artifact's standardisation (data statistics, not learned)."""
    head = loaded.head
    classes = [int(c) for c in np.asarray(head.classes_)]
    if classes != list(range(n_classes)):
        missing = sorted(set(range(n_classes)) - set(classes))
        names = [loaded.provenance["classes"][i] for i in missing]
        raise IncompatibleError(f"head {str(loaded.path)!r} never saw class(es) {names} in training; refit it on data with every class, or pass --head new")
    dim = int(head.n_features_in_)
    if isinstance(head, LogRegHead):
        mean, scale, weight, bias = head.as_linear()
        kind, params, module = "linear", {}, build_head_module(dim, n_classes, (), ())
        module[1].weight.data.copy_(torch.as_tensor(weight, dtype=torch.float32))
        module[1].bias.data.copy_(torch.as_tensor(bias, dtype=torch.float32))
        module[0].mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        module[0].scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    elif isinstance(head, TorchHead):
        kind, params = loaded.kind, {"hidden": tuple(head.hidden), "dropout": tuple(head.dropout)}
        module = copy.deepcopy(head.module_).cpu()
    else:
        raise IncompatibleError(f"head {str(loaded.path)!r} of kind {loaded.kind!r} cannot be fine-tuned")
    if fresh:
        torch.manual_seed(seed)
        standardize = module[0]
        kind, params, module = "linear", {}, build_head_module(dim, n_classes, (), ())
        module[0].load_state_dict(standardize.state_dict())
    return kind, params, module


def assemble(backbone: Backbone, head: nn.Module, unfreeze_spec: str, n_classes: int, seed: int) -> tuple[FineTuneModel, list[str], bool]:
    """Backbone + head, chosen blocks thawed, BatchNorm frozen. Returns (model, thawed
    blocks, whether inception's auxiliary classifier is trained)."""
    net = backbone.model
    thawed, frozen = unfreeze(net, unfreeze_spec)
    aux = getattr(net, "AuxLogits", None) is not None and bool(thawed)
    if aux:  # inception_v3: a fresh auxiliary classifier for our classes, trained with the backbone
        torch.manual_seed(seed)
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, n_classes)
        net.AuxLogits.requires_grad_(True)
        freeze_batchnorm(net.AuxLogits)
    else:
        drop_aux_classifiers(net)  # googlenet's 1000-way aux heads; inception's when nothing thaws
    model = FineTuneModel(net, head)
    model.frozen_in_eval = frozen
    head.requires_grad_(True)
    return model, thawed, aux


def param_groups(model: FineTuneModel, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Backbone and head at their own learning rates; no weight decay on biases and norms."""
    head_params = {id(p) for p in model.head.parameters()}
    aux = getattr(model.backbone, "AuxLogits", None)
    if aux is not None:
        head_params |= {id(p) for p in aux.parameters()}
    groups = []
    for part, lr in (("backbone", opts["lr_backbone"]), ("head", opts["lr_head"])):
        params = [p for p in model.parameters() if p.requires_grad and ((id(p) in head_params) == (part == "head"))]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "initial_lr": lr, "weight_decay": opts["weight_decay"] if decay else 0.0, "name": part})
    return groups


def make_optimizer(groups: list[dict[str, Any]], opts: dict[str, Any]) -> torch.optim.Optimizer:
    if opts["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=opts["lr_head"], momentum=opts["momentum"], nesterov=opts["momentum"] > 0)
    return torch.optim.AdamW(groups, lr=opts["lr_head"])


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


class Trainer:
    """One optimisation loop: forward, (aux) loss, accumulation, clipping, AMP, LR schedule."""

    def __init__(self, model: FineTuneModel, opts: dict[str, Any], device: torch.device, labels: np.ndarray, team: World | None = None,
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
        self.amp_dtype = None
        if opts["amp"]:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=opts["label_smoothing"])
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.opts["channels_last"] else x

    def train_epoch(self, loader, epoch: int, total_epochs: int, progress: Callable[[int, int, float], None] | None = None) -> EpochStats:
        """One pass; the learning rate follows ``lr_factor`` of global optimiser steps."""
        self.model.train()
        accum = self.opts["accum"]
        n_batches = len(loader)
        steps_per_epoch = math.ceil(n_batches / accum)
        total_steps = steps_per_epoch * total_epochs
        t0 = time.perf_counter()
        loss_sum, correct, seen, failures = 0.0, 0, 0, []
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
        if self.team.enabled:  # every rank stops together (a lone raise would leave the others waiting)
            value = value if self.team.sum([0.0 if math.isfinite(value) else 1.0], self.device)[0] == 0 else math.nan
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss became {value} in epoch {epoch + 1}, batch {b + 1}; lower --lr-backbone/--lr-head "
                                   "or --clip-grad and start over with --force (the last epoch's checkpoint is intact)")
        self.scaler.scale(loss / group_size).backward()
        if y is None:
            return 0.0, 0, 0
        return value, int((logits.detach().argmax(1) == y).sum()), len(y)

    def _step(self, step: int, total_steps: int) -> None:
        factor = lr_factor(step, total_steps, self.opts["schedule"], self.opts["warmup"])
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        if self.opts["clip_grad"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.opts["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def predict(self, loader) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """(probabilities [N, C], positions of decoded images, failures) in eval mode."""
        self.model.eval()
        probs, positions, failures = [], [], []
        with torch.inference_mode(), self._autocast():
            for batch in loader:
                failures += batch.failures
                if batch.images is None:
                    continue
                logits = self.model(self._to_device(batch.images))
                probs.append(torch.softmax(logits.float(), dim=1).cpu().double().numpy())
                positions += batch.positions
        width = self.module.head[-1].out_features
        return (np.concatenate(probs) if probs else np.empty((0, width))), np.asarray(positions, dtype=int), failures


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
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


# ----------------------------------------------------------------------------- runner


@dataclass
class FineTuneResult:
    model_path: str
    checkpoint: str
    base_head: str
    epochs_done: int
    best_epoch: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    trainable_blocks: list[str]
    n_train: int
    n_val: int
    n_test: int
    options: dict[str, Any]
    reports: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return d


def default_model_path(head_path: Path) -> Path:
    stem = head_path.name.removesuffix(".pt").removesuffix(".head")
    return head_path.with_name(f"{stem}.finetuned.pt")


def checkpoint_path_for(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.removesuffix(".pt") + ".ckpt")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        blob = torch_load_quietly(path)
    except Exception as exc:
        raise CacheError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); start over with --force") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CacheError(f"{str(path)!r} is not a featcache checkpoint; start over with --force")
    if int(blob.get("schema_version", 0)) > CHECKPOINT_SCHEMA:
        raise CacheError(f"checkpoint {str(path)!r} is from a newer featcache; upgrade featcache or start over with --force")
    return blob


def _scan_for_head(prov: dict[str, Any], data_dir: str | os.PathLike | None):
    root = Path(data_dir) if data_dir is not None else Path(str(prov.get("data_root", "")))
    if data_dir is None and not root.is_dir():
        raise DataError(f"the head's image folder {str(root)!r} does not exist any more; pass --data DATA_DIR")
    scan = scan_folder(root, prov.get("layout") or "auto")
    if list(scan.classes) != list(prov["classes"]):
        raise IncompatibleError(f"{str(scan.root)!r} has classes {scan.classes} but the head knows {prov['classes']}; fine-tune on the data the head was fitted on")
    return scan


def _check_backbone(backbone: Backbone, loaded: LoadedHead) -> None:
    """Beyond the weights (checked by ``LoadedHead.load_backbone``): the width and the preprocessing."""
    prov = loaded.provenance
    if backbone.embed_dim != int(loaded.head.n_features_in_) or backbone.embed_dim != int(prov["embed_dim"]):
        raise IncompatibleError(f"head {str(loaded.path)!r} takes {loaded.head.n_features_in_}-d embeddings but {prov['model']} gives {backbone.embed_dim}; refit the head on this backbone's cache")
    if backbone.preprocessing.to_dict() != prov["preprocessing"]:
        raise IncompatibleError(f"head {str(loaded.path)!r} was fitted with other preprocessing than {prov['model']} uses now; re-extract and refit the head")


def run_finetune(
    head_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    workers: int | None = None,
    device: str = "auto",
    wait: float = 0.0,
    plots: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> FineTuneResult:
    """Fine-tune the head's backbone + head on the head's image folder; see the module doc.

    Raises:
        UsageError, DataError, IncompatibleError, CacheError, LockHeldError, StorageError,
        WeightsUnavailableError, TrainingDiverged, Interrupted (the last epoch's checkpoint is intact).
    """
    head_path = Path(head_path)
    loaded = load_head(head_path)
    out_path = Path(out) if out is not None else default_model_path(head_path)
    if out_path.resolve() == head_path.resolve():
        raise UsageError(f"--out {str(out_path)!r} is the head being fine-tuned; choose another file")
    dev = resolve_device(device)
    team = world(dev.type)  # torchrun: one process per GPU (or CPU share); rank 0 writes
    dev = rank_device(dev, team)
    lock = WriterLock(out_path, command="finetune", wait=wait)
    team.run_on_main(lock.acquire)
    try:
        job = FineTuneJob(loaded, out_path, data_dir, dict(options or {}), resume, force, default_workers(dev.type) if workers is None else workers, dev, log, team)
        result = job.run(progress)
    finally:
        if team.is_main:
            lock.release()
    if team.is_main:
        result.reports = write_reports(out_path, result.metrics, job.classes, result.history, f"finetune {job.prov['model']}", plots=plots)
    return result


class FineTuneJob:
    """One fine-tuning run: everything decided up front (options, data, split, model), then
    ``run`` trains epoch by epoch, checkpointing after each and keeping the best."""

    def __init__(self, loaded: LoadedHead, out_path: Path, data_dir: str | os.PathLike | None, given: dict[str, Any], resume: bool,
                 force: bool, workers: int, device: torch.device, log: Callable[[str], None], team: World | None = None):
        self.loaded, self.prov, self.out_path, self.workers, self.device, self.log = loaded, loaded.provenance, out_path, workers, device, log
        self.team = team or World()
        self.ckpt_path = checkpoint_path_for(out_path)
        self.previous = self._previous_checkpoint(resume, force)
        self.opts = resolve_options(given, self.previous["options"] if self.previous else None)
        if self.opts["amp"] and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device (bf16 where supported, else fp16 with loss scaling); drop --amp on CPU")
        self._prepare_data(data_dir)
        self._prepare_model()
        self.failures: dict[str, str] = {}

    # -- setup
    def _previous_checkpoint(self, resume: bool, force: bool) -> dict[str, Any] | None:
        if resume:
            if not self.ckpt_path.is_file():
                raise UsageError(f"--resume: no checkpoint {str(self.ckpt_path)!r}; run without --resume to start")
            return load_checkpoint(self.ckpt_path)
        if self.ckpt_path.is_file() and not force:
            raise UsageError(f"{str(self.ckpt_path)!r} holds an earlier fine-tune of {str(self.out_path)!r}; pass --resume to continue it or --force to start over")
        return None

    def _prepare_data(self, data_dir: str | os.PathLike | None) -> None:
        """The head's folder, classes and split; refuse a checkpoint made from other ones."""
        self.scan = _scan_for_head(self.prov, data_dir)
        self.classes = list(self.scan.classes)
        self.rule = self.prov.get("split_rule") or {"val_fraction": 0.2, "seed": 0}
        records = self.scan.records
        self.labels = np.array([r.label for r in records])
        split, _ = assign_splits([r.relpath for r in records], self.labels, [r.split for r in records],
                                 self.rule.get("val_fraction", 0.2), self.rule.get("seed", 0))
        self.index = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
        if self.opts["epochs"] > 0 and not len(self.index["train"]):
            raise UsageError(f"{str(self.scan.root)!r} has no training images under the head's split; add images")
        self.identity = {"head_sha256": artifact_id(self.loaded.path), "model": self.prov["model"], "weights": self.prov["weights"],
                         "classes": self.classes, "split_rule": self.rule, "data_root": str(self.scan.root)}
        if self.previous is not None and self.previous["identity"] != self.identity:
            changed = [k for k in self.identity if self.previous["identity"].get(k) != self.identity[k]]
            raise IncompatibleError(f"checkpoint {str(self.ckpt_path)!r} was made from another head/data ({', '.join(changed)} differ); start over with --force")

    def _prepare_model(self) -> None:
        prov, opts = self.prov, self.opts
        self.backbone = self.loaded.load_backbone()
        _check_backbone(self.backbone, self.loaded)
        self.head_kind, self.head_params, head = head_module_from(self.loaded, len(self.classes), opts["head"] == "new", opts["seed"])
        self.model, self.thawed, aux = assemble(self.backbone, head, opts["unfreeze"], len(self.classes), opts["seed"])
        self.model.to(self.device)
        if opts["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        train_records = [self.scan.records[i] for i in self.index["train"]]
        self.train_set = AugmentedDataset(self.scan.root, train_records, train_transform(self.backbone.preprocessing, opts["augment"]), opts["seed"])
        self.trainer = Trainer(self.model, opts, self.device, self.labels[self.index["train"]], self.team, self.backbone.preprocessing.input_size)
        shown = ", ".join(self.thawed[-3:]) + (" …" if len(self.thawed) > 3 else "")
        n = {s: len(v) for s, v in self.index.items()}
        self.log(f"{prov['model']} + {self.loaded.kind} head ({'fresh' if opts['head'] == 'new' else 'from ' + self.loaded.path.name}); "
                 f"trainable: {len(self.thawed)} backbone blocks{f' ({shown})' if self.thawed else ''} + head{' + inception aux classifier' if aux else ''}; "
                 f"BatchNorm frozen; {n['train']} train / {n['val']} val / {n['test']} test images"
                 + (f"; DDP over {self.team.size} ranks x batch {opts['batch_size']}" if self.team.enabled else ""))

    # -- pieces of an epoch
    def evaluate(self, split_name: str) -> dict[str, Any] | None:
        """Metrics (plus mean cross-entropy ``loss``) of the current model on a split."""
        rows = self.index[split_name]
        if not len(rows):
            return None
        mine = np.arange(len(rows))[self.team.rank :: self.team.size]  # torchrun: each rank scores a share
        records = [self.scan.records[i] for i in rows[mine]]
        dataset = ImageFileDataset(self.scan.root, records, self.backbone.preprocessing.transform(), hash_files=False)
        proba, pos, bad = self.trainer.predict(make_loader(dataset, self.opts["batch_size"], self.workers, self.device.type == "cuda"))
        shares = self.team.gather((proba, mine[pos], {records[i].relpath: r for i, r in bad}))
        proba = np.concatenate([p for p, _, _ in shares])
        pos = np.concatenate([q for _, q, _ in shares]).astype(int)
        for _, _, failed in shares:
            self.failures.update(failed)
        if not len(pos):
            return None
        broken = ~np.isfinite(proba).all(axis=1)
        if broken.any():
            raise TrainingDiverged(f"the model's outputs are NaN/inf for {int(broken.sum())} of {len(broken)} {split_name} images; after training, "
                                   "lower --lr-backbone/--lr-head; before any training (epoch 0) the head does not fit this backbone: rerun with --debug and report it")
        y = self.labels[rows][pos]
        metrics = classification_metrics(y, proba, self.classes)
        metrics["loss"] = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())
        return metrics

    def save_model(self, epoch: int, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """The current weights as a model artifact (backbone without training-only aux heads); rank 0 only."""
        if not self.team.is_main:
            return
        prov, bb = self.prov, self.backbone
        backbone_state = {k: v for k, v in self.model.backbone.state_dict().items() if k.split(".")[0] not in AUX_CLASSIFIERS}
        weights_id = f"finetuned:sha256={state_digest(backbone_state)[:16]}"
        info = {"model": prov["model"], "weights_id": weights_id, "base_weights": prov["weights"], "preprocessing": bb.preprocessing.to_dict(),
                "embed_dim": bb.embed_dim, "removed_layer": bb.removed_layer}
        provenance = {
            "model": prov["model"], "weights": weights_id, "weights_spec": None, "seed": None, "preprocessing": bb.preprocessing.to_dict(),
            "embed_dim": bb.embed_dim, "classes": self.classes, "data_root": str(self.scan.root), "layout": self.scan.layout,
            "split_rule": self.rule, "base_head": str(self.loaded.path.resolve()), "base_head_sha256": self.identity["head_sha256"],
            "base_weights": prov["weights"], "finetune": self.opts,
            "epoch": epoch, "trainable_blocks": self.thawed, **{f"n_{s}": int(len(v)) for s, v in self.index.items()},
            "featcache_version": __version__, "torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__),
            "sklearn_version": sklearn.__version__, "numpy_version": np.__version__, "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        head_state = {"classes": np.arange(len(self.classes)), "n_features_in": bb.embed_dim, "state_dict": self.model.head.state_dict()}
        save_model_artifact(self.out_path, info, backbone_state, self.head_kind, self.head_params, head_state, provenance, metrics, {"history": history})

    def _restore(self) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
        prev = self.previous
        self.model.load_state_dict(prev["model"])
        self.trainer.optimizer.load_state_dict(prev["optimizer"])
        if prev.get("scaler"):
            self.trainer.scaler.load_state_dict(prev["scaler"])
        _set_rng_state(prev["rng"])
        self.log(f"resuming after epoch {prev['epoch']} of {self.opts['epochs']} from {self.ckpt_path}")
        return list(prev["history"]), dict(prev["best"]), int(prev["epoch"])

    # -- the run
    def run(self, progress: Callable[[int, int, float], None] | None = None) -> FineTuneResult:
        epochs = self.opts["epochs"]
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": 0, "val_accuracy": -1.0, "metrics": {}}
        start = 0
        if self.previous is not None:
            history, best, start = self._restore()
        t_start = time.perf_counter()
        epoch = start
        try:
            with sigterm_as_interrupt():
                if self.previous is None:  # the assembled model before training: the baseline every epoch must beat
                    metrics = {s: m for s in ("val", "test") if (m := self.evaluate(s)) is not None}
                    best = {"epoch": 0, "val_accuracy": metrics["val"]["accuracy"] if "val" in metrics else -1.0, "metrics": metrics}
                    self.save_model(0, metrics, history)
                    if "val" in metrics:
                        self.log(f"epoch 0 (as assembled): val loss {metrics['val']['loss']:.4f} acc {metrics['val']['accuracy']:.4f}")
                if start >= epochs > 0:
                    self.log(f"the checkpoint already finished {start} epochs; pass a larger --epochs to train more")
                for epoch in range(start, epochs):
                    best = self._epoch(epoch, history, best, progress)
        except KeyboardInterrupt:
            kept = f"the checkpoint of epoch {len(history)} is intact at {str(self.ckpt_path)!r}" if history else "no epoch had finished"
            raise Interrupted(f"interrupted during epoch {epoch + 1}; {kept}; run the same command with --resume to continue") from None
        if history and best["epoch"] == 0:
            self.log(f"no epoch beat the assembled model's validation accuracy ({best['val_accuracy']:.4f}); {self.out_path} holds it unchanged")
        metrics = {**best["metrics"], "best_epoch": best["epoch"]}
        return FineTuneResult(
            str(self.out_path), str(self.ckpt_path), str(self.loaded.path), len(history), int(best["epoch"]), metrics, history,
            round(time.perf_counter() - t_start, 3), self.thawed, *(int(len(self.index[s])) for s in ("train", "val", "test")),
            self.opts, {}, sorted(self.failures.items()), start if self.previous is not None else None,
        )

    def _epoch(self, epoch: int, history: list[dict[str, Any]], best: dict[str, Any], progress) -> dict[str, Any]:
        """Train one epoch, validate, keep the model if best, checkpoint; returns the new best."""
        opts, trainer = self.opts, self.trainer
        self.train_set.epoch = epoch
        team = self.team
        loader = make_loader(self.train_set, opts["batch_size"], self.workers, self.device.type == "cuda",
                             sampler=epoch_order(len(self.train_set), opts["seed"], epoch, team.rank, team.size))
        stats = trainer.train_epoch(loader, epoch, opts["epochs"], progress if team.is_main else None)
        if team.enabled:  # metrics of the whole epoch, not of one rank's share
            stats.loss_sum, correct, images = team.sum([stats.loss_sum, stats.correct, stats.images], self.device)
            stats.correct, stats.images = int(correct), int(images)
            stats.failures = [f for share in team.gather(stats.failures) for f in share]
        self.failures.update({self.train_set.records[i].relpath: r for i, r in stats.failures})
        val = self.evaluate("val")
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "lr_backbone": trainer.optimizer.param_groups[0]["lr"] if self.thawed else 0.0,
               "lr_head": trainer.optimizer.param_groups[-1]["lr"], "seconds": round(stats.seconds, 3),
               "images_per_s": round(stats.images / stats.seconds, 2) if stats.seconds else 0.0}
        if val is not None:
            row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        history.append(row)
        improved = val is None or val["accuracy"] > best["val_accuracy"]
        if improved:
            metrics = {"val": val} if val is not None else {}
            if (test := self.evaluate("test")) is not None:
                metrics["test"] = test
            best = {"epoch": epoch + 1, "val_accuracy": val["accuracy"] if val is not None else -1.0, "metrics": metrics}
            self.save_model(epoch + 1, metrics, history)
        if team.is_main:
            _save_checkpoint(self.ckpt_path, self.model, trainer, opts, self.identity, epoch + 1, history, best)
            _write_history(self.out_path, history)
        self.log(f"epoch {epoch + 1}/{opts['epochs']}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f}"
                 + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}" if val is not None else "")
                 + f" | lr {row['lr_head']:.2e} | {stats.seconds:.1f}s ({row['images_per_s']:.1f} img/s)" + (" *best*" if improved else ""))
        return best


def _save_checkpoint(path: Path, model: FineTuneModel, trainer: Trainer, opts: dict[str, Any], identity: dict[str, Any], epoch: int,
                     history: list[dict[str, Any]], best: dict[str, Any]) -> None:
    blob = {
        "format": CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_SCHEMA, "epoch": epoch, "options": opts, "identity": identity,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {}, "rng": _rng_state(),
        "history": history, "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def _write_history(model_path: Path, history: list[dict[str, Any]]) -> None:
    target = model_path.with_name(model_path.name.removesuffix(".pt") + ".history.json")
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(history, indent=2))
