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

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import AUX_CLASSIFIERS, Backbone, HubTrust, torch_load_quietly
from ..devices import resolve_device
from ..distributed import World, rank_device, world
from ..errors import CacheError, DataError, IncompatibleError, Interrupted, TrainingDivergedError, UsageError
from ..heads import (
    LoadedHead,
    artifact_id,
    classification_metrics,
    clear_reports,
    load_head,
    recorded_rule,
    save_blob,
    save_model_artifact,
    split_as_recorded,
    write_reports,
)
from ..images import default_workers, make_loader, scan_source
from ..inference import Feed, Mapper, ReadOptions, open_reader, run_batches
from ..interrupts import sigterm_as_interrupt
from ..options import build
from ..overlap import StageClock
from ..provenance import timestamp, versions
from ..store import WriterLock, atomic_path
from .augment import AugmentedDataset, epoch_order, train_transform
from .model import FineTuneModel, assemble, head_module_from
from .options import FinetuneOptions, resolve_options
from .trainer import Trainer, rng_state, set_rng_state, state_digest

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "featcache.checkpoint"
CHECKPOINT_SCHEMA = 1


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
    if data_dir is None and prov.get("layout") not in ("shards", "torchvision", "hf") and not root.exists():
        raise DataError(f"the head's image folder or manifest {str(root)!r} does not exist any more; pass --data DATA_DIR")
    layout = prov.get("layout") or "auto"
    scan = scan_source(root, layout if data_dir is None else "auto", prov.get("manifest_columns"))
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
    options: FinetuneOptions | Mapping[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    wait: float = 0.0,
    plots: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    trust_hub: HubTrust = False,
    **fields: Any,
) -> FineTuneResult:
    """Fine-tune the head's backbone + head on the head's image folder; see the module doc.
    ``options`` left out are the defaults (or the checkpoint's, on ``resume``); ``fields``
    replace single values (``epochs=1``, ``workers=0``). ``trust_hub``: consent to run the code
    of a ``hub:`` backbone the head names (``--trust-hub``; a job passes its own backbones' names).

    Raises:
        UsageError, DataError, IncompatibleError (UntrustedCodeError: a ``hub:`` backbone without consent), CacheError, LockHeldError, StorageError,
        WeightsUnavailableError, TrainingDivergedError, Interrupted (the last epoch's checkpoint is intact).
    """
    given = build(FinetuneOptions, options, **fields)
    head_path = Path(head_path)
    loaded = load_head(head_path)
    out_path = Path(out) if out is not None else default_model_path(head_path)
    if out_path.resolve() == head_path.resolve():
        raise UsageError(f"--out {str(out_path)!r} is the head being fine-tuned; choose another file")
    dev = resolve_device(given.device)
    team = world(dev.type)  # torchrun: one process per GPU (or CPU share); rank 0 writes
    dev = rank_device(dev, team)
    lock = WriterLock(out_path, command="finetune", wait=wait)
    team.run_on_main(lock.acquire)
    try:
        workers = default_workers(dev.type) if given.workers is None else given.workers
        job = FineTuneJob(loaded, out_path, data_dir, given, resume, force, workers, dev, team, trust_hub=trust_hub)
        result = job.run(progress)
    finally:
        if team.is_main:
            lock.release()
    if team.is_main:
        history = ([job.epoch0] if job.epoch0 else []) + result.history  # the reports show epoch 0 (as assembled) too
        result.reports = write_reports(out_path, result.metrics, job.classes, history, f"finetune {job.prov['model']}", plots=plots,
                                       best_epoch=result.best_epoch)
    return result


class FineTuneJob:
    """One fine-tuning run: everything decided up front (options, data, split, model), then
    ``run`` trains epoch by epoch, checkpointing after each and keeping the best."""

    def __init__(self, loaded: LoadedHead, out_path: Path, data_dir: str | os.PathLike | None, given: FinetuneOptions, resume: bool,
                 force: bool, workers: int, device: torch.device, team: World | None = None, *,
                 trust_hub: HubTrust = False):
        self.loaded, self.prov, self.out_path, self.workers, self.device = loaded, loaded.provenance, out_path, workers, device
        self.trust_hub = trust_hub
        self.team = team or World()
        self.ckpt_path = checkpoint_path_for(out_path)
        self.previous = self._previous_checkpoint(resume, force)
        self.opts = resolve_options(given, self.previous["options"] if self.previous else None)
        if self.opts.amp and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device (bf16 where supported, else fp16 with loss scaling); drop --amp on CPU")
        self._prepare_data(data_dir)
        self._prepare_model()
        self.failures: dict[str, str] = {}
        self.epoch0: dict[str, Any] | None = None  # val loss/accuracy before training, for the reports (not in ``history``)

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
        self.rule = recorded_rule(self.prov)
        records = self.scan.records
        self.labels = np.array([r.label for r in records])
        split = split_as_recorded(self.prov, [r.relpath for r in records], self.labels, [r.split for r in records])
        self.index = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
        if self.opts.epochs > 0 and not len(self.index["train"]):
            raise UsageError(f"{str(self.scan.root)!r} has no training images under the head's split; add images")
        self.identity = {"head_sha256": artifact_id(self.loaded.path), "model": self.prov["model"], "weights": self.prov["weights"],
                         "classes": self.classes, "split_rule": self.rule, "data_root": str(self.scan.root)}
        if self.previous is not None and self.previous["identity"] != self.identity:
            changed = [k for k in self.identity if self.previous["identity"].get(k) != self.identity[k]]
            raise IncompatibleError(f"checkpoint {str(self.ckpt_path)!r} was made from another head/data ({', '.join(changed)} differ); start over with --force")

    def _prepare_model(self) -> None:
        prov, opts = self.prov, self.opts
        self.backbone = self.loaded.load_backbone(self.trust_hub)
        _check_backbone(self.backbone, self.loaded)
        self.head_kind, self.head_params, head = head_module_from(self.loaded, len(self.classes), opts.head == "new", opts.seed)
        self.model, self.thawed, aux = assemble(self.backbone, head, opts.unfreeze, len(self.classes), opts.seed)
        self.model.to(self.device)
        if opts.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_records = [self.scan.records[i] for i in self.index["train"]]
        self.train_set = AugmentedDataset(self.scan.root, train_records, train_transform(self.backbone.preprocessing, opts.augment), opts.seed)
        self.trainer = Trainer(self.model, opts, self.device, self.labels[self.index["train"]], self.team, self.backbone.preprocessing.input_size)
        if self.trainer.precision.note:
            logger.info(self.trainer.precision.note)
        shown = ", ".join(self.thawed[-3:]) + (" …" if len(self.thawed) > 3 else "")
        n = {s: len(v) for s, v in self.index.items()}
        logger.info(f"{prov['model']} + {self.loaded.kind} head ({'fresh' if opts.head == 'new' else 'from ' + self.loaded.path.name}); "
                    f"trainable: {len(self.thawed)} backbone blocks{f' ({shown})' if self.thawed else ''} + head{' + inception aux classifier' if aux else ''}; "
                    f"BatchNorm frozen; {n['train']} train / {n['val']} val / {n['test']} test images"
                    + (f"; DDP over {self.team.size} ranks x batch {opts.batch_size}" if self.team.enabled else ""))

    # -- pieces of an epoch
    def evaluate(self, split_name: str) -> dict[str, Any] | None:
        """Metrics (plus mean cross-entropy ``loss``) of the current model on a split."""
        rows = self.index[split_name]
        if not len(rows):
            return None
        mine = np.arange(len(rows))[self.team.rank :: self.team.size]  # torchrun: each rank scores a share
        records = [self.scan.records[i] for i in rows[mine]]
        proba, pos, bad = self._score(records)
        shares = self.team.gather((proba, mine[pos], {records[i].relpath: r for i, r in bad}))
        proba = np.concatenate([p for p, _, _ in shares])
        pos = np.concatenate([q for _, q, _ in shares]).astype(int)
        for _, _, failed in shares:
            self.failures.update(failed)
        if not len(pos):
            return None
        broken = ~np.isfinite(proba).all(axis=1)
        if broken.any():
            what = f"the model's outputs are NaN/inf for {int(broken.sum())} of {len(broken)} {split_name} images"
            if self.trainer.guard is None:  # nothing trained yet: not a learning-rate problem
                raise TrainingDivergedError(f"{what} before any training (epoch 0): the head does not fit this backbone; rerun with --debug and report it")
            raise TrainingDivergedError(f"training diverged: {what} after training; {self.trainer.lower_lr_advice()}")
        y = self.labels[rows][pos]
        metrics = classification_metrics(y, proba, self.classes)
        metrics["loss"] = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())
        return metrics

    def _score(self, records: list) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """The current model's class probabilities for ``records`` through the one inference
        path (decoder processes, uint8 pixels normalised on the device): (probabilities [N, C]
        of the decoded images, their positions in ``records``, failures)."""
        prep = self.backbone.preprocessing
        read = ReadOptions(self.opts.batch_size, self.workers, hash_files=False)
        mapper = Mapper(prep, self.trainer.scoring_engine())
        probs: list[np.ndarray] = []
        positions: list[int] = []
        failures: list[tuple[int, str]] = []

        def consume(_: int, batch, rows_of) -> None:
            failures.extend(batch.failures)
            if rows_of is not None:
                probs.append(rows_of().astype(np.float64))
                positions.extend(batch.positions)

        feed = Feed(open_reader(self.scan.root, records, [prep], read, self.device), self.device, [prep], read, bool(records))
        try:
            run_batches([mapper], feed, consume, self.device, StageClock())
        finally:
            feed.close()
        return (np.concatenate(probs) if probs else np.empty((0, self.trainer.n_classes))), np.asarray(positions, dtype=int), failures

    def save_model(self, epoch: int, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """The current weights as a model artifact (backbone without training-only aux heads); rank 0 only."""
        if not self.team.is_main:
            return
        prov, bb = self.prov, self.backbone
        backbone_state = {k: v for k, v in self.model.backbone.state_dict().items() if k.split(".")[0] not in AUX_CLASSIFIERS}
        weights_id = f"finetuned:sha256={state_digest(backbone_state)[:16]}"
        tapped = {k: prov[k] for k in ("layer", "layer_pool", "token_pool") if prov.get(k)}  # a head on a tapped layer: the model is tapped there too
        info = {"model": prov["model"], "weights_id": weights_id, "base_weights": prov["weights"], "preprocessing": bb.preprocessing.to_dict(),
                "embed_dim": bb.embed_dim, "removed_layer": bb.removed_layer, **tapped}
        provenance = {
            "model": prov["model"], "weights": weights_id, "weights_spec": None, "seed": None, "preprocessing": bb.preprocessing.to_dict(),
            "embed_dim": bb.embed_dim, "classes": self.classes, "data_root": str(self.scan.root), "layout": self.scan.layout, **tapped,
            "split_rule": self.rule, "base_head": str(self.loaded.path.resolve()), "base_head_sha256": self.identity["head_sha256"],
            "base_weights": prov["weights"], "finetune": self.opts.training(), "trained_in": self.trainer.precision.name,
            "epoch": epoch, "trainable_blocks": self.thawed, **{f"n_{s}": int(len(v)) for s, v in self.index.items()},
            **versions("sklearn", model=prov["model"]), "fitted_at": timestamp(),
        }
        head_state = {"classes": np.arange(len(self.classes)), "n_features_in": bb.embed_dim, "state_dict": self.model.head.state_dict()}
        save_model_artifact(self.out_path, info, backbone_state, self.head_kind, self.head_params, head_state, provenance, metrics, {"history": history})

    def _restore(self) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
        prev = self.previous
        self.model.load_state_dict(prev["model"])
        self.trainer.optimizer.load_state_dict(prev["optimizer"])
        if prev.get("scaler"):
            self.trainer.scaler.load_state_dict(prev["scaler"])
        set_rng_state(prev["rng"])
        threads = prev.get("threads")
        if threads and threads != torch.get_num_threads():  # sums split across threads round differently
            torch.set_num_threads(int(threads))
            logger.info(f"using {threads} threads as the checkpoint's run did (another count would not continue it bit-for-bit)")
        logger.info(f"resuming after epoch {prev['epoch']} of {self.opts.epochs} from {self.ckpt_path}")
        return list(prev["history"]), dict(prev["best"]), int(prev["epoch"])

    # -- the run
    def run(self, progress: Callable[[int, int, float], None] | None = None) -> FineTuneResult:
        epochs = self.opts.epochs
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": 0, "val_accuracy": -1.0, "metrics": {}}
        start = 0
        if self.previous is not None:
            history, best, start = self._restore()
            self.epoch0 = _epoch0_row(best["metrics"]) if best["epoch"] == 0 else None  # else it is not kept in the checkpoint
        t_start = time.perf_counter()
        epoch = start
        try:
            with sigterm_as_interrupt():
                if self.previous is None:  # the assembled model before training: the baseline every epoch must beat
                    metrics = {s: m for s in ("val", "test") if (m := self.evaluate(s)) is not None}
                    best = {"epoch": 0, "val_accuracy": metrics["val"]["accuracy"] if "val" in metrics else -1.0, "metrics": metrics}
                    self.epoch0 = _epoch0_row(metrics)
                    if self.team.is_main:
                        clear_reports(self.out_path)  # the previous run's reports must not sit beside this run's model
                    self.save_model(0, metrics, history)
                    if "val" in metrics:
                        logger.info(f"epoch 0 (as assembled): val loss {metrics['val']['loss']:.4f} acc {metrics['val']['accuracy']:.4f}")
                if start >= epochs > 0:
                    logger.info(f"the checkpoint already finished {start} epochs; pass a larger --epochs to train more")
                try:
                    for epoch in range(start, epochs):
                        best = self._epoch(epoch, history, best, progress)
                except TrainingDivergedError as exc:
                    raise TrainingDivergedError(f"{exc}{self._kept_after_divergence(history, best)}") from exc
        except KeyboardInterrupt:
            kept = f"the checkpoint of epoch {len(history)} is intact at {str(self.ckpt_path)!r}" if history else "no epoch had finished"
            raise Interrupted(f"interrupted during epoch {epoch + 1}; {kept}; run the same command with --resume to continue") from None
        if history and best["epoch"] == 0:
            logger.info(f"no epoch beat the assembled model's validation accuracy ({best['val_accuracy']:.4f}); {self.out_path} holds it unchanged")
        metrics = {**best["metrics"], "best_epoch": best["epoch"]}
        return FineTuneResult(
            str(self.out_path), str(self.ckpt_path), str(self.loaded.path), len(history), int(best["epoch"]), metrics, history,
            round(time.perf_counter() - t_start, 3), self.thawed, *(int(len(self.index[s])) for s in ("train", "val", "test")),
            self.opts.training(), {}, sorted(self.failures.items()), start if self.previous is not None else None,
        )

    def _kept_after_divergence(self, history: list[dict[str, Any]], best: dict[str, Any]) -> str:
        """The end of a divergence message: how to start again, and that nothing of the diverged epoch was saved."""
        model = f"{self.out_path.name} holds epoch {best['epoch']}" + (" (as assembled)" if best["epoch"] == 0 else "")
        if history:
            return f", and start over with --force; nothing of the diverged epoch was saved: the checkpoint of epoch {len(history)} is intact, {model}"
        again = " with --force" if self.ckpt_path.is_file() else ""
        return f", and run again{again}; nothing of the diverged epoch was saved: {model}"

    def _epoch(self, epoch: int, history: list[dict[str, Any]], best: dict[str, Any], progress) -> dict[str, Any]:
        """Train one epoch, validate, keep the model if best, checkpoint; returns the new best."""
        opts, trainer = self.opts, self.trainer
        self.train_set.epoch = epoch
        team = self.team
        loader = make_loader(self.train_set, opts.batch_size, self.workers, self.device.type == "cuda",
                             sampler=epoch_order(len(self.train_set), opts.seed, epoch, team.rank, team.size))
        stats = trainer.train_epoch(loader, epoch, opts.epochs, progress if team.is_main else None)
        if team.enabled:  # metrics of the whole epoch, not of one rank's share
            stats.loss_sum, correct, images = team.sum([stats.loss_sum, stats.correct, stats.images], self.device)
            stats.correct, stats.images = int(correct), int(images)
            stats.failures = [f for share in team.gather(stats.failures) for f in share]
        self.failures.update({self.train_set.records[i].relpath: r for i, r in stats.failures})
        trainer.check_epoch(stats.loss, epoch)  # before anything of this epoch is evaluated or saved
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
        logger.info(f"epoch {epoch + 1}/{opts.epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f}"
                    + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}" if val is not None else "")
                    + f" | lr {row['lr_head']:.2e} | {stats.seconds:.1f}s ({row['images_per_s']:.1f} img/s)" + (" *best*" if improved else ""))
        return best


def _epoch0_row(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The history row of the assembled model (epoch 0): its val loss and accuracy, when it had val images."""
    val = metrics.get("val")
    return {"epoch": 0, "val_loss": val["loss"], "val_accuracy": val["accuracy"]} if val and "loss" in val else None


def _save_checkpoint(path: Path, model: FineTuneModel, trainer: Trainer, opts: FinetuneOptions, identity: dict[str, Any], epoch: int,
                     history: list[dict[str, Any]], best: dict[str, Any]) -> None:
    blob = {
        "format": CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_SCHEMA, "epoch": epoch, "options": opts.training(), "identity": identity,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {}, "rng": rng_state(),
        "threads": torch.get_num_threads(), "history": history, "best": best,
    }
    save_blob(path, blob)


def _write_history(model_path: Path, history: list[dict[str, Any]]) -> None:
    target = model_path.with_name(model_path.name.removesuffix(".pt") + ".history.json")
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(history, indent=2))
