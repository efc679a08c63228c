"""Stage 1: what is missing -> the inference path -> cache writer, for one or several backbones.

Reader, mapper and the loop are the one inference path (``inference.py``: decoder processes
read, hash, decode, resize and crop; the frozen backbone on the engine measured fastest
here); the writer is ``store``'s ``CacheWriter`` (rows committed every ``commit_every``
images or ``commit_seconds``). ``extract_many`` works out what each ``Target`` (one backbone
and its cache) lacks, wires the path to the writers and times them, with torchrun ranks
sharing the files. ``ExtractOptions`` holds every option, checked when it is built.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import ENGINES, PRECISIONS, TOKEN_POOLS, Backbone, HubTrust, check_model_name, choice_path, load_backbone, tune
from .changes import SCAN_STARTED, check_content, racy
from .choices import DECODES, GPU_DECODERS, canonical_weights
from .devices import resolve_device
from .distributed import World, rank_device, world
from .errors import FeatcacheError, Interrupted, UsageError
from .images import DEFAULT_MAX_PIXELS, LAYOUTS, DecodedBatch, ImageRecord, ManifestColumns, ScanFailure, ScanResult, check_gpu_decode, retry_under, scan_source
from .inference import Feed, Mapper, ReadOptions, build_mapper, default_cache_dir, engine_context, open_reader, resolve_precision, run_batches
from .interrupts import sigterm_as_interrupt
from .options import JOB_LEVEL, OUTSIDE_IDENTITY, build, check_device, check_types, choose, require
from .overlap import StageClock
from .provenance import versions
from .store import DTYPES, CacheWriter, KnownFiles, PendingRow, WriterLock, check_compatible, encode_paths, read_cache_meta, repair_cache

logger = logging.getLogger(__name__)

EMBEDDING_DEFINITION = "input of the model's final classification layer (classifier replaced by Identity)"


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExtractOptions:
    """How stage 1 embeds a folder: the ``extract`` flags and a job file's ``[[backbones]]`` keys
    (besides ``model``). Checked when built; ``None`` workers means sized to the machine."""

    weights: str = "DEFAULT"  # DEFAULT, a weights name, none (seeded random init) or a state_dict path
    batch_size: int = 32
    workers: int | None = field(default=None, metadata={OUTSIDE_IDENTITY: True})
    device: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True, JOB_LEVEL: True})
    dtype: str = "float32"
    layout: str = "auto"
    seed: int = 0  # for weights "none"
    commit_every: int = 1000
    commit_seconds: float = 60.0
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    amp: bool = False
    engine: str = "auto"
    precision: str = "fp32"
    decode: str = "exact"
    gpu_decoder: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})  # --decode gpu: torchvision, nvimgcodec or auto (images/gpu_decode.py)
    repair: bool = field(default=False, metadata={OUTSIDE_IDENTITY: True})  # drop damaged parts (re-extracting their images) and retry every failed file
    # hash every file the size+mtime check calls unchanged and extract again those whose bytes differ
    # from their row's SHA-256 (mtimes restored by touch -r, cp -p, rsync -t); retry every failed file
    verify_content: bool = field(default=False, metadata={OUTSIDE_IDENTITY: True})
    path_col: str = "path"  # a manifest's columns (CSV, TSV, JSON lines, Parquet)
    label_col: str = "label"
    split_col: str = "split"
    layers: tuple[str, ...] = ()  # tap these layers (one cache each) instead of the final embedding
    token_pool: str = "cls"  # how a tapped token sequence is pooled: cls or cls+mean

    def __post_init__(self) -> None:
        check_types(self)
        require(bool(self.weights.strip()), "--weights is empty; give DEFAULT, a weights name, none or a state_dict path")
        object.__setattr__(self, "weights", canonical_weights(self.weights))
        require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        require(self.workers is None or self.workers >= 0, f"--workers must be 0 or more (got {self.workers})")
        check_device(self)
        choose(self, "dtype", DTYPES)
        choose(self, "layout", LAYOUTS)
        require(self.commit_every >= 1, f"--commit-every must be at least 1 (got {self.commit_every})")
        require(self.commit_seconds > 0, f"--commit-seconds must be more than 0 (got {self.commit_seconds})")
        require(self.max_pixels is None or self.max_pixels >= 1, f"--max-pixels must be at least 1 (got {self.max_pixels})")
        choose(self, "engine", ENGINES)
        choose(self, "precision", PRECISIONS)
        choose(self, "decode", DECODES, "exact is the default; draft: faster JPEG decode of large photos; gpu: nvJPEG on CUDA; both change pixels slightly")
        choose(self, "token_pool", TOKEN_POOLS)
        choose(self, "gpu_decoder", GPU_DECODERS, "auto: torchvision's nvJPEG while torchvision has it, else nvImageCodec (pip install -e '.[gpu]')")
        for name in ("path_col", "label_col", "split_col"):
            require(bool(getattr(self, name).strip()), f"--{name.replace('_', '-')} is empty; give the manifest column's name")
        layers = tuple(x.strip() for x in self.layers)
        require(all(layers), "--layer is empty; give a module name (see `featcache models --layers MODEL`) or lastK")
        require(len(set(layers)) == len(layers), f"--layer names the same layer twice ({', '.join(layers)})")
        object.__setattr__(self, "layers", layers)


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
    hashed: int = 0  # files the size+mtime check passed that were read and hashed (--verify-content: all; else recently modified ones)
    content_changed: int = 0  # of those, files whose bytes differed from their row's SHA-256 (extracted again: counted in new)
    repaired: dict[str, Any] = field(default_factory=dict)  # --repair: what was rebuilt or dropped
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
    decode: str = "exact"
    layer: str | None = None  # --layer: the tapped layer this cache holds
    rank: int = 0  # torchrun: this process's rank (only rank 0 reports)
    world_size: int = 1
    gpu_decoder: str | None = None  # --decode gpu: the decoder library used
    timings: dict[str, float] = field(default_factory=dict)  # where the run's time went (StageClock)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


def file_name_part(s: str) -> str:
    """``s`` as one safe file-name component (letters, digits, ``-_.``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-")


def default_cache_path(model: str, weights: str, data_root: Path, cache_dir: Path | None = None, precision: str = "fp32", decode: str = "exact",
                       seed: int = 0, layer: str | None = None) -> Path:
    """``cache/<model>__<weights>[__bf16][__draft][__at-<layer>]__<root name>-<hash>.h5``: one cache per backbone,
    weights (a seed other than 0 for ``none``: ``none-seed7``), precision, decode, tapped layer and root."""
    base = Path(cache_dir or default_cache_dir())
    w = Path(weights).stem if os.sep in str(weights) else str(weights)
    if w == "none" and seed:
        w = f"none-seed{seed}"
    if str(data_root).startswith(("torchvision:", "hf:")):  # a dataset spec: named after the dataset, tagged by the spec
        parts = str(data_root).split(":", 2)
        root_tag = hashlib.sha1(str(data_root).encode()).hexdigest()[:8]
        data_root = Path(f"{parts[1]}-{Path(parts[2]).name}" if len(parts) == 3 else f"hf-{Path(parts[1]).name}")
    else:
        root_tag = hashlib.sha1(str(Path(data_root).resolve()).encode()).hexdigest()[:8]
    tag = ("" if precision == "fp32" else f"__{precision}") + ("" if decode == "exact" else f"__{decode}") + (f"__at-{file_name_part(layer)}" if layer else "")
    return base / f"{file_name_part(model)}__{file_name_part(w)}{tag}__{file_name_part(Path(data_root).name) or 'root'}-{root_tag}.h5"


def cache_paths(model: str, opts: ExtractOptions, data_root: Path, out: str | os.PathLike | Sequence | None, precision: str,
                cache_dir: Path | None = None) -> list[Path]:
    """The caches one ``--model`` fills: one, or one per ``--layer`` (an explicit ``--out`` then
    gains ``__at-<layer>`` before its suffix, unless a list gives one path per layer)."""
    layers: list[str | None] = list(opts.layers) or [None]
    if isinstance(out, (list, tuple)):
        if len(out) != len(layers):
            raise UsageError(f"{len(out)} cache paths for {len(layers)} layers of {model}")
        return [Path(o) for o in out]
    if out is not None:
        out = Path(out)
        return [out] if len(layers) == 1 else [out.with_name(f"{out.stem}__at-{file_name_part(layer)}{out.suffix}") for layer in layers]
    return [default_cache_path(model, opts.weights, data_root, cache_dir, precision, opts.decode, opts.seed, layer) for layer in layers]


def build_meta(backbone: Backbone, scan: ScanResult, dtype: str, device: torch.device, precision: str = "fp32", decode: str = "exact",
               tap: int | None = None) -> dict[str, Any]:
    prov = backbone.provenance(tap)
    return {
        **prov,
        "embedding": EMBEDDING_DEFINITION if "layer" not in prov else f"output of layer {prov['layer']}, pooled: {prov['layer_pool']}",
        **run_meta(backbone.name, scan, dtype, device, precision, decode),
    }


def run_meta(model: str, scan: ScanResult, dtype: str, device: torch.device, precision: str, decode: str) -> dict[str, Any]:
    """What a cache records besides the backbone's own provenance: the data, the run's choices, the versions."""
    return {
        "dtype": dtype,
        "data_root": scan.data_root,
        "layout": scan.layout,
        **({"manifest_columns": scan.columns} if scan.columns else {}),
        "classes": list(scan.classes),
        "engine": "eager",  # updated to the engine that ran (set_meta)
        "precision": precision,
        "decode": decode,
        "device": str(device),
        **versions(model=model),
    }


ProgressFn = Callable[[int, int, float], None]


@dataclass
class Target:
    """One cache: a backbone's embedding (or one tapped layer's columns of it)."""

    backbone: Backbone | None  # None until loaded: a run with nothing to extract never loads it (_deferred_pass)
    out_path: Path
    meta: dict[str, Any]
    lock: WriterLock
    summary: ExtractSummary
    columns: slice  # this cache's columns of the backbone's output: all of it, or a tapped layer's
    writer: CacheWriter | None = None
    todo: set[str] = field(default_factory=set)  # relpaths this cache lacks (all ranks)
    removed: list[str] = field(default_factory=list)
    last_commit: float = field(default_factory=time.monotonic)


@dataclass
class Pass:
    """One backbone forward per batch and the caches it fills: one, or one per tapped layer."""

    backbone: Backbone | None  # None until loaded (see Target)
    targets: list[Target]
    mapper: Mapper | None = None

    @property
    def todo(self) -> set[str]:
        return set().union(*(t.todo for t in self.targets))


def _open_writer(t: Target, create: bool, repair: bool) -> CacheWriter:
    """The lock holder's writer (after ``--repair`` made the cache consistent); with ``create``
    the cache exists afterwards (staging ranks read it)."""
    if repair:
        report = repair_cache(t.out_path, t.meta)
        t.summary.repaired = {"rebuilt_manifest": report.rebuilt_manifest, "dropped_parts": report.dropped, "superseded": report.superseded}
    writer = CacheWriter(t.out_path, t.meta)
    if create and not t.out_path.exists():
        writer.commit()
    return writer


@dataclass
class ScanColumns:
    """A scan as numpy columns, for the diff against each cache: its records, then what it
    found but cannot use (``failed``: recorded as failures, with fingerprints)."""

    records: Sequence[ImageRecord]
    failed: Sequence[ScanFailure]
    paths: np.ndarray  # encoded as the store encodes them: records, then failed
    sizes: np.ndarray
    mtimes: np.ndarray
    root: Path
    started: float  # time.time() before the scan: a lower bound of when this run hashes any file
    digests: dict[str, bytes | None] = field(default_factory=dict)  # files hashed by this run's content checks (shared by its caches)

    @classmethod
    def of(cls, scan: ScanResult, started: float) -> ScanColumns:
        keys = [*scan.records, *scan.failed]
        return cls(scan.records, scan.failed, encode_paths([r.relpath for r in keys]), np.fromiter((r.size for r in keys), np.int64, len(keys)),
                   np.fromiter((r.mtime_ns for r in keys), np.int64, len(keys)), scan.root, started)


def _open_target(t: Target, w: World, scan: ScanColumns, opts: ExtractOptions) -> None:
    """Open the locked cache (rank 0 first: it adopts parts of earlier crashed runs) and work
    out what this cache lacks (numpy over the encoded paths: stat-only for a folder of
    unchanged files, but for the few files the content check reads); each rank then writes
    parts of its own. What the scan found unusable is recorded as failed, once."""
    retry = lambda reason: opts.repair or opts.verify_content or retry_under(reason, opts.max_pixels)  # noqa: E731
    main = w.run_on_main(lambda: _open_and_check(t, scan, opts, retry, w.enabled))
    if w.enabled:  # after rank 0 removed the rows whose bytes changed: they are missing here too
        t.writer = CacheWriter(t.out_path, t.meta, staging=True, tag=f"rank{w.rank}-")
        known = t.writer.known_files(retry=retry)
        unchanged = known.unchanged(scan.paths, scan.sizes, scan.mtimes)
    else:
        t.writer, known, unchanged = main
    n = len(scan.records)
    t.todo = {scan.records[i].relpath for i in np.flatnonzero(~unchanged[:n]).tolist()}
    t.removed = known.missing_from(scan.paths)
    t.summary.removed = len(t.removed)
    t.summary.cached = n - len(t.todo)
    if not w.enabled:
        t.writer.remove(t.removed)
    if w.is_main:
        for f in (scan.failed[i] for i in np.flatnonzero(~unchanged[n:]).tolist()):
            t.writer.add_failure(f.relpath, f.reason, f.size, f.mtime_ns)
            t.summary.new_failed += 1


def _open_and_check(t: Target, scan: ScanColumns, opts: ExtractOptions, retry: Callable[[str], bool], ranks: bool) -> tuple[CacheWriter, KnownFiles, np.ndarray]:
    """Rank 0: the writer, the cache's known files and which scanned files they hold unchanged
    (size and mtime), less the rows whose bytes changed all the same: every such file with
    ``--verify-content``, else the racy ones (``pipeline/changes.py``) are hashed. Those rows are
    removed at once, so a run interrupted before extracting them again leaves no stale row."""
    writer = _open_writer(t, create=ranks, repair=opts.repair)
    known = writer.known_files(retry=retry)
    unchanged = known.unchanged(scan.paths, scan.sizes, scan.mtimes)
    n = len(scan.records)
    suspects = unchanged[:n] & (True if opts.verify_content else racy(scan.mtimes[:n], writer.manifest.meta.get(SCAN_STARTED)))
    check = check_content(t.out_path, scan.root, scan.records, scan.paths, np.flatnonzero(suspects), scan.digests) if suspects.any() else None
    t.meta[SCAN_STARTED] = scan.started  # recorded by this run's commits (read above first: the previous run's)
    writer.set_meta(**{SCAN_STARTED: scan.started})
    if check is None:
        return writer, known, unchanged
    t.summary.hashed, t.summary.content_changed = check.hashed, len(check.changed)
    if len(check.changed):
        changed = [scan.records[i].relpath for i in check.changed.tolist()]
        logger.info(f"{t.summary.model}: {len(changed)} of {check.hashed} file(s) hashed changed content with the same size and mtime "
                    f"(e.g. {changed[0]}); extracting them again")
        unchanged[check.changed] = False
        writer.remove(changed)
        if ranks:  # committed before the ranks open their writers
            writer.commit()
    return writer, known, unchanged


def _symbolic_weights(spec: str) -> bool:
    """DEFAULT, none or a weights name: what they load is fixed by the library versions a cache
    records (a weights file's content is not, nor a hub folder's code)."""
    return re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", spec) is not None and not Path(spec).expanduser().exists()


def _deferred_pass(model: str, out_paths: list[Path], opts: ExtractOptions, scan: ScanResult, dev: torch.device, precision: str, w: World,
                   wait: float) -> Pass | None:
    """A pass whose backbone is loaded only once its cache turns out to lack files: when the
    cache exists and records this very request (model, symbolic weights and seed, the data and
    its classes, dtype, precision, decode, library versions), a run with nothing to extract or
    only files to drop never builds the model. None (load it up front) otherwise: a new cache,
    a weights file, a hub or fine-tuned model, --layer, --repair."""
    path = out_paths[0]
    if (opts.layers or opts.repair or model.startswith("hub:") or model.endswith((".pt", ".pth")) or not _symbolic_weights(opts.weights)
            or len(out_paths) != 1 or not path.is_file()):
        return None
    try:
        stored = read_cache_meta(path)
    except FeatcacheError:
        return None  # loading the backbone as usual reports it
    run = run_meta(model, scan, opts.dtype, dev, precision, opts.decode)
    same = (stored.get("model") == model and stored.get("weights_spec") == opts.weights and stored.get("embedding") == EMBEDDING_DEFINITION
            and stored.get("seed") == (opts.seed if opts.weights == "none" else None) and not ({"layer", "layers"} & set(stored))
            and all(stored.get(k) == v for k, v in run.items() if k not in ("device", "engine")))
    if not same:
        return None
    meta = {**stored, **run, "engine": stored.get("engine", "eager")}
    summary = ExtractSummary(str(path), model, stored["weights"], int(stored["embed_dim"]), str(dev), classes=list(scan.classes), rank=w.rank,
                             world_size=w.size, skipped=list(scan.skipped), precision=precision, decode=opts.decode, engine=meta["engine"])
    return Pass(None, [Target(None, path, meta, WriterLock(path, command=f"extract --model {model}", wait=wait), summary, slice(None))])


def _load_deferred(p: Pass, backbone: Backbone, scan: ScanResult, dtype: str, dev: torch.device, precision: str, decode: str) -> None:
    """A deferred pass's cache lacks files: its backbone, checked to be the one the cache's rows came from."""
    t = p.targets[0]
    meta = build_meta(backbone, scan, dtype, dev, precision, decode)
    check_compatible(t.out_path, t.meta, meta)
    t.meta.update(meta)
    t.writer.set_meta(**meta)
    p.backbone = t.backbone = backbone
    t.summary.weights, t.summary.embed_dim = backbone.weights_id, int(meta["embed_dim"])


def _merge_ranks(w: World, t: Target) -> None:
    """torchrun: every rank's counts and failures to rank 0, which adopts all staged parts
    (by reopening the cache), records failures and removals, and commits once."""
    summary = t.summary
    shares = w.gather({"new": summary.new, "new_failed": summary.new_failed, "failures": t.writer.take_failures(),
                       "interrupted": summary.interrupted, "commits": summary.commits})
    summary.new = sum(s["new"] for s in shares)
    summary.new_failed = sum(s["new_failed"] for s in shares)
    summary.commits = sum(s["commits"] for s in shares)
    summary.interrupted = any(s["interrupted"] for s in shares)

    def merge() -> tuple[list[tuple[str, str]], int]:
        final = CacheWriter(t.out_path, t.meta)  # adopts every rank's parts
        for s in shares:
            final.add_failures(s["failures"])
        final.remove(t.removed)
        final.commit()
        if not summary.interrupted:
            final.compact()
        final.close()
        return sorted(final.failures.items()), final.n_rows

    summary.failures, summary.rows = w.broadcast(w.run_on_main(merge))


def _finish_target(t: Target, w: World) -> None:
    """Commit what is finished (interrupted or not), merge ranks, compact, fill the summary."""
    t.writer.commit()
    t.summary.commits = t.writer.commits
    if w.enabled:
        _merge_ranks(w, t)
    else:
        if not t.summary.interrupted:
            t.writer.compact()
        t.writer.close()
        t.summary.failures = sorted(t.writer.failures.items())
        t.summary.rows = t.writer.n_rows
    t.summary.failed = len(t.summary.failures)


def _write_batch(p: Pass, batch: DecodedBatch, rows_of: Callable[[], np.ndarray] | None, records: Sequence[ImageRecord], commit_every: int,
                 commit_seconds: float, clock: StageClock) -> None:
    """The writer for one backbone's batch: for each of its caches the failures recorded, the
    rows it lacks (its columns) buffered, a commit when enough rows or time have passed."""
    emb = rows_of() if rows_of is not None else None
    t0 = time.perf_counter()
    shared = len(p.targets) == 1
    for t in p.targets:
        for i, reason in batch.failures:
            r = records[i]
            if shared or r.relpath in t.todo:
                t.writer.add_failure(r.relpath, reason, r.size, r.mtime_ns)
                t.summary.new_failed += 1
        if emb is not None:
            keep = [k for k, i in enumerate(batch.positions) if shared or records[i].relpath in t.todo]
            rows = [PendingRow(records[i].relpath, records[i].label, records[i].split, records[i].size, records[i].mtime_ns, batch.sha256[k])
                    for k, i in ((k, batch.positions[k]) for k in keep)]
            part = (emb if shared else emb[np.asarray(keep, dtype=np.intp)])[:, t.columns]
            if rows:
                t.writer.add(rows, np.ascontiguousarray(part))
                t.summary.new += len(rows)
        if t.writer.pending >= commit_every or time.monotonic() - t.last_commit >= commit_seconds:
            c0 = time.perf_counter()
            t.writer.commit()
            clock.commit += time.perf_counter() - c0
            t.last_commit = time.monotonic()
    clock.writer += time.perf_counter() - t0


def extract_many(
    data_dir: str | os.PathLike,
    models: Sequence[str],
    outs: Sequence[str | os.PathLike | None] | None = None,
    options: ExtractOptions | Mapping[str, Any] | None = None,
    *,
    wait: float = 0.0,
    progress: ProgressFn | None = None,
    trust_hub: HubTrust = False,
    **fields: Any,
) -> list[ExtractSummary]:
    """Extract every image under ``data_dir`` not yet in each backbone's cache, reading and
    decoding each file once for all of them (each backbone applies its own preprocessing).
    ``fields`` replace single values of ``options`` (e.g. ``workers=0``). ``trust_hub``: consent
    to run a ``hub:`` backbone that a fine-tuned model file given as a model names (``--trust-hub``).

    Raises:
        DataError, BackboneError, WeightsUnavailableError, CacheError, IncompatibleError,
        LockHeldError, StorageError, Interrupted (after committing finished batches).
    """
    clock = StageClock()
    opts = build(ExtractOptions, options, **fields)
    weights, batch_size, decode, engine = opts.weights, opts.batch_size, opts.decode, opts.engine
    dev = resolve_device(opts.device)
    models = [check_model_name(m) for m in models]
    if len(set(models)) != len(models):
        raise UsageError(f"--model names the same backbone twice ({', '.join(models)})")
    outs = list(outs) if outs is not None else [None] * len(models)
    if len(outs) != len(models):
        raise UsageError(f"{len(outs)} --out paths for {len(models)} --model values; give one per model, in order")
    precision = opts.precision
    if opts.amp:  # the older spelling of reduced precision on CUDA
        if dev.type != "cuda":
            raise UsageError("--amp needs a CUDA device; on CPU use --precision bf16 (used where the CPU runs bf16 natively)")
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    chosen = resolve_precision(precision, dev)

    if decode == "gpu":
        check_gpu_decode(dev)
    w = world(dev.type)
    dev = rank_device(dev, w)
    started = time.time()  # every row this run writes is hashed after this (the racy rule, pipeline/changes.py)
    scan = scan_source(data_dir, opts.layout, ManifestColumns(opts.path_col, opts.label_col, opts.split_col),
                       shard_index=default_cache_dir() / ".shard-index")
    load = partial(load_backbone, weights=weights, seed=opts.seed, layers=opts.layers, token_pool=opts.token_pool, trust_hub=trust_hub)
    passes: list[Pass] = []
    for model, out in zip(models, outs):
        deferred = _deferred_pass(model, cache_paths(model, opts, scan.data_root, out, chosen.name), opts, scan, dev, chosen.name, w, wait)
        if deferred is not None:
            passes.append(deferred)
            continue
        backbone = load(model)
        taps: list[int | None] = list(range(len(backbone.taps))) or [None]
        p = Pass(backbone, [])
        for tap, out_path in zip(taps, cache_paths(model, opts, scan.data_root, out, chosen.name)):
            layer = None if tap is None else backbone.taps[tap].name
            meta = build_meta(backbone, scan, opts.dtype, dev, chosen.name, decode, tap)
            summary = ExtractSummary(str(out_path), model, backbone.weights_id, meta["embed_dim"], str(dev), classes=list(scan.classes), layer=layer,
                                     rank=w.rank, world_size=w.size, skipped=list(scan.skipped), precision=chosen.name, decode=decode)
            p.targets.append(Target(backbone, out_path, meta, WriterLock(out_path, command=f"extract --model {model}", wait=wait), summary,
                                    slice(None) if tap is None else backbone.tap_columns(tap)))
        passes.append(p)
    targets = [t for p in passes for t in p.targets]
    if len({t.out_path.resolve() for t in targets}) != len(targets):
        raise UsageError("two --model values would write the same cache; give each its own --out")

    t0 = time.perf_counter()
    opened: list[Target] = []
    columns = ScanColumns.of(scan, started)
    try:
        for t in targets:  # rank 0 holds every cache's lock for the whole run
            w.run_on_main(t.lock.acquire)
            opened.append(t)
            _open_target(t, w, columns, opts)
        for p in passes:  # a cache whose backbone was not loaded lacks files after all
            if p.backbone is None and p.todo:
                _load_deferred(p, load(p.targets[0].summary.model), scan, opts.dtype, dev, chosen.name, decode)
        passes = [p for p in passes if p.backbone is not None]
        # one pass over every file some cache lacks; each rank takes a deterministic share
        todo_all = [r for r in scan.records if any(r.relpath in t.todo for t in targets)]
        todo = todo_all[w.rank :: w.size]
        for t in targets:
            if w.is_main and (t.removed or t.todo):
                logger.info(f"{t.summary.model}{f' {t.summary.layer}' if t.summary.layer else ''}: {len(t.todo)} to extract, {t.summary.cached} cached, "
                            f"{len(t.removed)} removed" + (f" ({w.size} ranks)" if w.enabled else ""))
        # the decoder processes start reading while the engines are built
        preps = [p.backbone.preprocessing for p in passes]
        read = ReadOptions(batch_size, opts.workers, opts.max_pixels, decode, opts.gpu_decoder)
        pass_todo = [p.todo for p in passes]
        batches = open_reader(scan.root, todo, preps, read, dev, needs=[tuple(r.relpath in todo_p for todo_p in pass_todo) for r in todo])
        for p in passes:
            p.mapper = build_mapper(p.backbone, engine, dev, chosen, batch_size, len(p.todo), p.targets[0].out_path.parent)
            for t in p.targets:
                if p.todo:
                    t.summary.engine = p.mapper.engine.name
                    t.writer.set_meta(engine=p.mapper.engine.name)
                else:  # nothing ran: say (and keep) the engine that made the cache's rows
                    t.summary.engine = t.writer.manifest.meta.get("engine", t.summary.engine)
        feed = Feed(batches, dev, preps, read, bool(todo))
        if feed.decoder is not None:
            for t in targets:
                t.summary.gpu_decoder = feed.decoder.name
                t.writer.set_meta(gpu_decoder=feed.decoder.name)
        done = 0

        def on_batch(n: int) -> None:
            nonlocal done
            done += n
            if progress and w.is_main:
                progress(done, len(todo), time.perf_counter() - t0)

        def write(k: int, batch: DecodedBatch, rows_of: Callable[[], np.ndarray] | None) -> None:
            _write_batch(passes[k], batch, rows_of, todo, opts.commit_every, opts.commit_seconds, clock)

        clock.setup = time.perf_counter() - clock.start
        try:
            with sigterm_as_interrupt():
                run_batches([p.mapper for p in passes], feed, write, dev, clock, on_batch)
        except KeyboardInterrupt:
            for t in targets:
                t.summary.interrupted = True
        finally:
            feed.close(clock)
        f0 = time.perf_counter()
        for t in targets:  # finished batches are complete rows: keep them, interrupted or not
            _finish_target(t, w)
        clock.finish = time.perf_counter() - f0
    finally:
        if w.is_main:
            for t in opened:
                t.lock.release()
    seconds = round(time.perf_counter() - t0, 3)
    timings = clock.report()
    for t in targets:
        t.summary.timings = timings
        t.summary.seconds = seconds
        t.summary.images_per_s = round(t.summary.new / seconds, 2) if seconds > 0 and t.summary.new else 0.0
    if any(t.summary.interrupted for t in targets):
        new = ", ".join(f"{t.summary.new} new images in {str(t.out_path)!r}" for t in targets)
        raise Interrupted(f"interrupted after {new}; they are committed, run the same command again to resume")
    return [t.summary for t in targets]


def run_extract(data_dir: str | os.PathLike, model: str, weights: str = "DEFAULT", out: str | os.PathLike | None = None,
                options: ExtractOptions | Mapping[str, Any] | None = None, **fields: Any) -> ExtractSummary:
    """Extract one backbone's embeddings (``extract_many`` with one model); same options."""
    return extract_many(data_dir, [model], [out], build(ExtractOptions, options, weights=weights), **fields)[0]


def measure_engines(model: str, weights: str = "DEFAULT", *, precision: str = "fp32", batch_size: int = 32, device: str = "auto", seed: int = 0,
                    cache_dir: str | os.PathLike | None = None,
                    trust_hub: HubTrust = False) -> dict[str, Any]:
    """Measure every engine available here on ``model`` (random tensors) and remember the fastest
    where ``extract --engine auto`` into ``cache_dir`` looks for it (``trust_hub`` as for ``extract_many``)."""
    require(batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})")
    dev = resolve_device(device)
    chosen = resolve_precision(precision, dev)
    backbone = load_backbone(model, weights, seed=seed, trust_hub=trust_hub)
    ctx = engine_context(backbone, dev, chosen, batch_size, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    tuning = tune(ctx)
    return {"model": model, "weights": backbone.weights_id, "precision": chosen.name, "batch_size": batch_size, "device": str(dev),
            "engine": tuning.best, "images_per_s": tuning.rates, "skipped": tuning.reasons, "choice_file": str(choice_path(ctx))}
