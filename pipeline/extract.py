"""Stage 1: what is missing -> batches -> backbone -> cache writer.

Reader (``ImageFileDataset`` + ``DataLoader`` workers: read, hash, decode, transform),
mapper (``embed_batch``: the frozen backbone under ``inference_mode``) and writer
(``CacheWriter``: buffered rows committed every ``commit_every`` images or
``commit_seconds``) are separate pieces; ``run_extract`` only wires and times them.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .backbones import Backbone, load_backbone
from .cache import CacheWriter, PendingRow
from .distributed import World, rank_device, world
from .data import DEFAULT_MAX_PIXELS, DecodeError, ImageRecord, ScanResult, decode_image, read_bytes, scan_folder
from .errors import Interrupted, UsageError
from .engines import ENGINES, Engine, build_engine
from .hardware import PrecisionChoice, choose_precision
from .interrupts import sigterm_as_interrupt
from .locks import WriterLock

EMBEDDING_DEFINITION = "input of the model's final classification layer (classifier replaced by Identity)"


# ----------------------------------------------------------------------------- reader


@dataclass
class DecodedBatch:
    positions: list[int]  # indices into the job's record list, for the decoded images
    images: torch.Tensor | None  # [B, 3, H, W] float32, or None when none decoded
    sha256: list[str]
    failures: list[tuple[int, str]]  # (record index, reason)


class ImageFileDataset(Dataset):
    """Reads, hashes and decodes one file per item; never substitutes a failed file.

    ``hash_files=False`` skips the SHA-256 (training and prediction do not record it);
    subclasses change how a decoded image becomes a tensor by overriding ``preprocess``.
    """

    def __init__(self, root: Path, records: Sequence[ImageRecord], transform: Callable, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 hash_files: bool = True):
        self.root = Path(root)
        self.records = list(records)
        self.transform = transform
        self.max_pixels = max_pixels
        self.hash_files = hash_files

    def __len__(self) -> int:
        return len(self.records)

    def preprocess(self, i: int, image) -> torch.Tensor:
        return self.transform(image)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            data = read_bytes(self.root / self.records[i].relpath)
            sha = hashlib.sha256(data).hexdigest() if self.hash_files else ""
            image = decode_image(data, self.max_pixels)
            return i, self.preprocess(i, image), sha
        except DecodeError as exc:
            return i, None, f"!{exc}"
        except Exception as exc:  # a transform failure on a pathological image: record, do not stop
            return i, None, f"!cannot preprocess: {type(exc).__name__}: {exc}"


def collate_decoded(items: list[tuple[int, torch.Tensor | None, str]]) -> DecodedBatch:
    ok = [(i, t, s) for i, t, s in items if t is not None]
    failures = [(i, s[1:]) for i, t, s in items if t is None]
    images = torch.stack([t for _, t, _ in ok]) if ok else None
    return DecodedBatch([i for i, _, _ in ok], images, [s for _, _, s in ok], failures)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoders must not fight the backbone for cores


def default_workers() -> int:
    """Decoder processes: half the cores (the backbone uses the rest), at least 1, at most 8;
    under torchrun the cores are shared by the node's ranks."""
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 2) // (2 * ranks_here)))


def make_loader(dataset: ImageFileDataset, batch_size: int, workers: int, pin_memory: bool, sampler: Sequence[int] | None = None) -> DataLoader:
    """Batches of decoded images; ``sampler`` gives the item order (default: in order)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),  # worker seeds must not consume the global RNG (resume stays bit-exact)
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


# ----------------------------------------------------------------------------- mapper


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r} is not supported; choose auto, cpu or cuda")
    return torch.device(device)


def prepare_model(backbone: Backbone, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    model = backbone.model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def embed_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = True, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Eager backbone forward for one batch; float32 numpy [B, D] (predict and the benches)."""
    precision = PrecisionChoice("fp32" if amp_dtype is None else str(amp_dtype), amp_dtype, "")
    return Engine("eager", model, precision, device, channels_last, len(images)).embed(images)


# ----------------------------------------------------------------------------- runner


@dataclass
class ExtractSummary:
    cache: str
    model: str
    weights: str
    embed_dim: int
    device: str
    new: int = 0
    cached: int = 0
    failed: int = 0  # files currently failing (this run's and earlier ones)
    new_failed: int = 0
    removed: int = 0
    rows: int = 0  # rows the cache now holds
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    commits: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    engine: str = "eager"
    precision: str = "fp32"
    rank: int = 0  # torchrun: this process's rank (only rank 0 reports)
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


def default_cache_path(model: str, weights: str, data_root: Path, cache_dir: Path | None = None, precision: str = "fp32") -> Path:
    """``cache/<model>__<weights>[__bf16]__<root name>-<hash>.h5``: one cache per backbone, weights, precision and root."""
    base = Path(cache_dir or os.environ.get("FEATCACHE_CACHE_DIR", "cache"))
    clean = lambda s: "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-")  # noqa: E731
    w = Path(weights).stem if os.sep in str(weights) else str(weights)
    root_tag = hashlib.sha1(str(Path(data_root).resolve()).encode()).hexdigest()[:8]
    tag = "" if precision == "fp32" else f"__{precision}"
    return base / f"{clean(model)}__{clean(w)}{tag}__{clean(Path(data_root).name) or 'root'}-{root_tag}.h5"


def build_meta(backbone: Backbone, scan: ScanResult, dtype: str, device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    return {
        **backbone.provenance(),
        "embedding": EMBEDDING_DEFINITION,
        "dtype": dtype,
        "data_root": str(scan.root),
        "layout": scan.layout,
        "classes": list(scan.classes),
        "engine": "eager",  # updated to the engine that ran (set_meta)
        "precision": precision,
        "device": str(device),
        "featcache_version": __version__,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }


ProgressFn = Callable[[int, int, float], None]


def _open_writer(path: Path, meta: dict[str, Any], create: bool) -> CacheWriter:
    """The lock holder's writer; with ``create`` the index exists afterwards (staging ranks read it)."""
    writer = CacheWriter(path, meta)
    if create and not path.exists():
        writer.commit()
    return writer


def _merge_ranks(w: World, writer: CacheWriter, path: Path, meta: dict[str, Any], removed: list[str], summary: ExtractSummary) -> None:
    """torchrun: every rank's counts and failures to rank 0, which adopts all staged parts
    (by reopening the cache), records failures and removals, and commits once."""
    shares = w.gather({"new": summary.new, "new_failed": summary.new_failed, "failures": writer.take_failures(),
                       "interrupted": summary.interrupted, "commits": summary.commits})
    summary.new = sum(s["new"] for s in shares)
    summary.new_failed = sum(s["new_failed"] for s in shares)
    summary.commits = sum(s["commits"] for s in shares)
    summary.interrupted = any(s["interrupted"] for s in shares)

    def merge() -> tuple[list[tuple[str, str]], int]:
        final = CacheWriter(path, meta)  # adopts every rank's parts
        for s in shares:
            final.add_failures(s["failures"])
        final.remove(removed)
        final.commit()
        if not summary.interrupted:
            final.compact()
        return sorted(final.failures.items()), sum(final.state.valid)

    summary.failures, summary.rows = w.broadcast(w.run_on_main(merge))


def run_extract(
    data_dir: str | os.PathLike,
    model: str,
    weights: str = "DEFAULT",
    out: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    layout: str = "auto",
    seed: int = 0,
    commit_every: int = 1000,
    commit_seconds: float = 60.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    amp: bool = False,
    engine: str = "auto",
    precision: str = "fp32",
    wait: float = 0.0,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> ExtractSummary:
    """Extract embeddings for every image under ``data_dir`` not yet in the cache.

    Raises:
        DataError, BackboneError, WeightsUnavailableError, CacheError, IncompatibleError,
        LockHeldError, StorageError, Interrupted (after committing finished batches).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if commit_every < 1:
        raise UsageError(f"--commit-every must be at least 1 (got {commit_every})")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more (got {workers})")
    dev = resolve_device(device)
    if amp:  # the older spelling of reduced precision on CUDA
        if dev.type != "cuda":
            raise UsageError("--amp needs a CUDA device; on CPU use --precision bf16 (used where the CPU runs bf16 natively)")
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    chosen = choose_precision(precision, dev)
    if chosen.note:
        log(chosen.note)

    w = world(dev.type)
    dev = rank_device(dev, w)
    scan = scan_folder(data_dir, layout)
    backbone = load_backbone(model, weights, seed=seed)
    out_path = Path(out) if out is not None else default_cache_path(model, weights, scan.root, precision=chosen.name)
    meta = build_meta(backbone, scan, dtype, dev, chosen.name)
    summary = ExtractSummary(str(out_path), model, backbone.weights_id, backbone.embed_dim, str(dev), classes=list(scan.classes), rank=w.rank, world_size=w.size)
    summary.skipped = list(scan.skipped)

    t0 = time.perf_counter()
    # Rank 0 (the only rank, without torchrun) holds the cache's lock for the whole run.
    lock = WriterLock(out_path, command=f"extract --model {model}", wait=wait)
    w.run_on_main(lock.acquire)
    try:
        # torchrun: rank 0 opens the cache (adopting parts of earlier crashed runs) before the
        # others read it; each rank then extracts its share into parts of its own.
        main_writer = w.run_on_main(lambda: _open_writer(out_path, meta, create=w.enabled))
        writer = CacheWriter(out_path, meta, staging=True, tag=f"rank{w.rank}-") if w.enabled else main_writer
        known = writer.known()
        on_disk = {r.relpath for r in scan.records}
        todo_all = [r for r in scan.records if known.get(r.relpath) != (r.size, r.mtime_ns)]
        removed = sorted(set(known) - on_disk)
        todo = todo_all[w.rank :: w.size]  # deterministic share: every rank computes the same list
        summary.removed = len(removed)
        summary.cached = len(scan.records) - len(todo_all)
        if not w.enabled:
            writer.remove(removed)
        if w.is_main and (removed or todo_all):
            log(f"{len(todo_all)} to extract, {summary.cached} cached, {len(removed)} removed" + (f" ({w.size} ranks)" if w.enabled else ""))

        net = prepare_model(backbone, dev)
        runner = build_engine(engine, net, dev, chosen, batch_size, backbone.preprocessing.input_size, len(todo_all),
                              out_path.parent, log if w.is_main else (lambda m: None))
        summary.engine, summary.precision = runner.name, chosen.name
        writer.set_meta(engine=runner.name)
        loader = make_loader(ImageFileDataset(scan.root, todo, backbone.preprocessing.transform(), max_pixels), batch_size, workers if todo else 0, dev.type == "cuda")
        done, last_commit = 0, time.monotonic()
        try:
            with sigterm_as_interrupt():
                for batch in loader if todo else ():
                    for i, reason in batch.failures:
                        r = todo[i]
                        writer.add_failure(r.relpath, reason, r.size, r.mtime_ns)
                        summary.new_failed += 1
                    if batch.images is not None:
                        emb = runner.embed(batch.images)
                        rows = [PendingRow(todo[i].relpath, todo[i].label, todo[i].split, todo[i].size, todo[i].mtime_ns, s) for i, s in zip(batch.positions, batch.sha256)]
                        writer.add(rows, emb)
                        summary.new += len(rows)
                    done += len(batch.positions) + len(batch.failures)
                    if writer.pending >= commit_every or time.monotonic() - last_commit >= commit_seconds:
                        writer.commit()
                        last_commit = time.monotonic()
                    if progress and w.is_main:
                        progress(done, len(todo), time.perf_counter() - t0)
        except KeyboardInterrupt:
            summary.interrupted = True
        writer.commit()  # finished batches are complete rows: keep them, interrupted or not
        summary.commits = writer.commits
        if w.enabled:
            _merge_ranks(w, writer, out_path, meta, removed, summary)
        else:
            if not summary.interrupted:
                writer.compact()
            summary.failures = sorted(writer.failures.items())
            summary.rows = sum(writer.state.valid)
        summary.failed = len(summary.failures)
    finally:
        if w.is_main:
            lock.release()
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.images_per_s = round(summary.new / summary.seconds, 2) if summary.seconds > 0 and summary.new else 0.0
    if summary.interrupted:
        raise Interrupted(f"interrupted after {summary.new} new images; they are committed to {str(out_path)!r}, run the same command again to resume")
    return summary
