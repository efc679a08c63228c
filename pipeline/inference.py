"""The one inference path: records -> reader -> engine -> rows.

Every way images go through a model takes it: ``extract`` writes the rows to caches,
``predict`` scores them with a head, the fine-tune scores its model on val and test. None
keeps an image-to-model loop of its own, so each gets what the others have: decoder
processes sized to the machine (``images.default_workers``), uint8 pixels through shared
memory and to the device (normalised there, bit-identical to ``weights.transforms()``),
draft and GPU JPEG decoding, a recorded failure per bad file (never a substitute image),
every engine (``backbones.engines``: eager, compile, CUDA graph, ONNX Runtime, OpenVINO,
checked against eager), and the overlap of one batch's forward with the previous batch's
consumer (on CUDA on a thread of its own).

Pieces, in the order a caller uses them: :func:`resolve_device` and :func:`resolve_precision`
(what this machine runs), :func:`open_reader` (the decoder processes start reading while the
engines are built), :class:`Mapper` (a model on its engine), :func:`feed` (on CUDA the
feeder thread, started once the engines exist), :func:`run_batches` (the loop).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .backbones import Backbone, Engine, EngineContext, PrecisionChoice, Preprocessing, TorchEngine, build_engine, choose_precision, engines_dir, model_identity
from .images import (
    DEFAULT_MAX_PIXELS,
    DecodedBatch,
    DeviceFeeder,
    ImageRecord,
    SharedDecodeDataset,
    check_gpu_decode,
    collate_shared,
    default_workers,
    make_loader,
    open_gpu_decoder,
)
from .overlap import StageClock, WriterThread

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- this machine


def default_cache_dir() -> Path:
    """Where caches go by default (``FEATCACHE_CACHE_DIR``, else ``cache/``), and with them the
    engines' measurements and exports (``.engines``)."""
    return Path(os.environ.get("FEATCACHE_CACHE_DIR", "cache"))


def engines_home(provenance: dict) -> Path:
    """Where the engines for an artifact's backbone are measured and kept: beside the cache it
    was fitted on (where ``extract`` measured them), else the default cache folder."""
    cache = provenance.get("cache")
    if cache and Path(cache).parent.is_dir():
        return Path(cache).parent
    return default_cache_dir()


def resolve_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """``--precision`` as this hardware runs it, saying so when the request was changed."""
    chosen = choose_precision(precision, device)
    if chosen.note:
        logger.info(chosen.note)
    return chosen


def resolve_decode(decode: str, device: torch.device) -> str:
    """``--decode`` as this device runs it: GPU decoding needs CUDA (a recorded choice, e.g. a
    head's cache, falls back to exact decoding here, said once)."""
    if decode == "gpu" and device.type != "cuda":
        logger.info("decode gpu needs a CUDA device: decoding exactly on the CPU here (pixels differ from GPU-decoded ones by ~1e-3)")
        return "exact"
    if decode == "gpu":
        check_gpu_decode(device)
    return decode


def prepare_model(backbone: Backbone, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """The backbone's module on ``device`` in eval mode (channels_last where it helps)."""
    model = backbone.model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def engine_context(backbone: Backbone, device: torch.device, precision: PrecisionChoice, batch_size: int, cache_dir: Path) -> EngineContext:
    """What building, measuring or remembering an engine for ``backbone`` needs; choices and
    exports live beside the caches (``<cache_dir>/.engines``)."""
    return EngineContext(prepare_model(backbone, device), device, precision, batch_size, backbone.preprocessing.input_size,
                         engines_dir(cache_dir), lambda: model_identity(backbone.model, backbone.provenance()))


def embed_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = True,
                amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Eager forward for one batch of normalised images; float32 numpy [B, D] (the reference
    the engines and exports are checked against, and the benches' baseline)."""
    precision = PrecisionChoice("fp32" if amp_dtype is None else str(amp_dtype), amp_dtype, "")
    return TorchEngine("eager", model, precision, device, channels_last, len(images)).embed(images)


# ----------------------------------------------------------------------------- mapper


@dataclass
class Mapper:
    """One model on its engine: a batch's uint8 pixels in (moved to the engine's device and
    normalised there), float32 rows out."""

    preprocessing: Preprocessing
    engine: Engine

    def launch(self, batch: DecodedBatch) -> Callable[[], np.ndarray] | None:
        """Start the batch's forward; the returned function waits for its rows (None: nothing decoded)."""
        if batch.images is None:
            return None
        pixels = batch.images.to(self.engine.device, non_blocking=True)
        return self.engine.embed_async(self.preprocessing.normalize(pixels))


def build_mapper(backbone: Backbone, engine: str, device: torch.device, precision: PrecisionChoice, batch_size: int, n_images: int,
                 cache_dir: Path) -> Mapper:
    """``backbone`` on ``engine`` (auto: the engine measured fastest here for a job of ``n_images``)."""
    ctx = engine_context(backbone, device, precision, batch_size, cache_dir)
    return Mapper(backbone.preprocessing, build_engine(engine, ctx, n_images))


class ScoringModule(torch.nn.Module):
    """A classifier's probabilities as an engine's rows: softmax of its logits, in float32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


# ----------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class ReadOptions:
    """How the reader decodes: batch size, decoder processes (None: sized to the machine),
    the decompression-bomb limit, exact / draft / gpu JPEG decoding, and whether each file's
    SHA-256 is computed (caches record it; scoring does not need it)."""

    batch_size: int = 32
    workers: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "exact"
    gpu_decoder: str = "auto"
    hash_files: bool = True


def open_reader(root: Path, records: Sequence[ImageRecord], preprocessings: Sequence[Preprocessing], opts: ReadOptions, device: torch.device,
                needs: Sequence[Sequence[bool]] | None = None) -> Iterator[list[DecodedBatch]]:
    """Batches of ``records`` decoded once and preprocessed by each model's own preprocessing
    (``needs[i][k]``: record ``i`` goes to model ``k``; default all), as uint8 pixels. The
    decoder processes start at once, so they read while the caller builds its engines; on
    CUDA each worker holds 2 batches ahead, not 4 (15 workers x 2 x 256 uint8 images are
    already 1.2 GB of shared memory)."""
    if not records:
        return iter(())
    needs = needs if needs is not None else [(True,) * len(preprocessings)] * len(records)
    draft = max((p.draft_size for p in preprocessings), default=None) if opts.decode == "draft" else None
    dataset = SharedDecodeDataset(root, records, [p.pixels() for p in preprocessings], needs, opts.max_pixels, draft,
                                  gpu_decode=opts.decode == "gpu", hash_files=opts.hash_files)
    workers = default_workers(device.type) if opts.workers is None else opts.workers
    return iter(make_loader(dataset, opts.batch_size, workers, False, collate=partial(collate_shared, needs=needs),
                            prefetch=2 if device.type == "cuda" else 4))


class Feed:
    """The batches as the loop takes them: on CUDA through the feeder thread (pinning, copying
    and, with ``--decode gpu``, decoding on the GPU ahead of the model), elsewhere as read.
    Built once the engines exist (a CUDA graph being captured must not see another thread
    allocate page-locked memory); close it when done."""

    def __init__(self, batches: Iterator[list[DecodedBatch]], device: torch.device, preprocessings: Sequence[Preprocessing], opts: ReadOptions,
                 any_records: bool):
        self.decoder = open_gpu_decoder(opts.gpu_decoder, device) if opts.decode == "gpu" and any_records else None
        self.feeder = DeviceFeeder(batches, device, [p.pixels() for p in preprocessings], self.decoder) if device.type == "cuda" and any_records else None
        self.batches = batches

    def __iter__(self) -> Iterator[list[DecodedBatch]]:
        return iter(self.feeder) if self.feeder is not None else self.batches

    def close(self, clock: StageClock | None = None) -> None:
        if self.feeder is not None:
            self.feeder.close()
            if clock is not None:
                clock.feeder_busy = self.feeder.busy_seconds


# ----------------------------------------------------------------------------- the loop


Consume = Callable[[int, DecodedBatch, "Callable[[], np.ndarray] | None"], None]


def run_batches(mappers: Sequence[Mapper], batches: Iterable[list[DecodedBatch]], consume: Consume, device: torch.device, clock: StageClock,
                on_batch: Callable[[int], None] = lambda n: None) -> None:
    """For each batch (one ``DecodedBatch`` per mapper), start every mapper's forward, then hand
    the *previous* batch to ``consume(mapper index, batch, rows_of)`` — so batch k+1 runs on the
    device while batch k's rows are consumed (on CUDA on a thread of its own, so a commit or a
    file write never stalls the GPU). ``rows_of()`` waits for and returns the rows (None:
    nothing of the batch decoded; its ``failures`` still count). A batch whose forward was
    started when an interrupt came is still consumed: it is complete. ``on_batch(n)`` reports
    the files each consumed batch covered."""
    pending: list[tuple[int, DecodedBatch, Callable[[], np.ndarray] | None]] = []

    def write(launched: list) -> None:
        for k, batch, rows_of in launched:
            consume(k, batch, rows_of)
        on_batch(len({i for _, b, _ in launched for i in b.positions} | {i for _, b, _ in launched for i, _ in b.failures}))

    writer = WriterThread(write) if device.type == "cuda" else None

    def drain() -> None:
        """The batches queued for the consumer, then the one in flight: all complete."""
        nonlocal writer
        if writer:
            closing, writer = writer, None
            closing.close()
        if pending:
            write(pending)

    loop_start = time.perf_counter()
    waited = loop_start
    try:
        for k, parts in enumerate(batches):
            now = time.perf_counter()
            if k == 0:
                clock.first_batch = now - loop_start
            else:
                clock.wait_data += now - waited
                clock.images_after_first += len({i for b in parts for i in b.positions})
            end_span = clock.gpu_span(device)
            launched = [(m, batch, mapper.launch(batch)) for m, (mapper, batch) in enumerate(zip(mappers, parts))]
            end_span()
            previous, pending = pending, launched
            if previous:
                writer.submit(previous) if writer else write(previous)
            waited = time.perf_counter()
        drain()
    except KeyboardInterrupt:
        drain()
        raise
    finally:
        if writer is not None:  # another error: the queued batches are consumed before the caller lets go
            writer.close(raise_error=False)
        clock.loop = time.perf_counter() - loop_start
