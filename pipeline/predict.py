"""predict: new images, or rows already in a cache, through a saved head or fine-tuned model.

Images take the one inference path (``inference.py``) that ``extract`` takes, with the
engine, precision and decoding the head's cache recorded (so predictions use the numbers
the head was trained on) unless told otherwise; their rows go through the head batch by
batch into a CSV, JSON-lines or Parquet file (``predictions.py``), never all held at once.
Rows already embedded are scored from the cache without the backbone (``cache=``); with
both images and a cache, the files the cache lacks are extracted into it first (as
``extract`` would: incremental, crash-safe) and every image is scored from the cache.
Under torchrun each rank takes a contiguous share of the images and rank 0 joins the
ranks' outputs, in input order, into one file.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import ENGINES, PRECISIONS, HubTrust, check_artifact_backbone
from .choices import DECODES, GPU_DECODERS
from .devices import resolve_device
from .distributed import World, rank_device, world
from .errors import DataError, IncompatibleError, Interrupted, UsageError
from .heads import LoadedHead, head_scorer, literal_text, load_head, score_chunk_rows
from .images import DEFAULT_MAX_PIXELS, DecodedBatch, ImageRecord, is_manifest, is_shards, scan_source
from .inference import Feed, ReadOptions, build_mapper, engines_home, open_reader, resolve_decode, resolve_precision, run_batches
from .interrupts import sigterm_as_interrupt
from .memory import budget_bytes, check_budget, working_budget
from .options import OUTSIDE_IDENTITY, build, check_device, check_types, choose, require
from .overlap import StageClock
from .predictions import PredictionWriter, Scored, concatenate, output_format, score
from .provenance import ROW_NUMBERS, recorded
from .store import read_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "unlabeled", "all")
PREVIEW_ROWS = 10_000  # rows kept in memory (for --json and the summary) when predictions go to a file
GRID_IMAGES = 32
CACHE_CHUNK = 1 << 14  # rows scored at a time from a cache: 128 MiB at 2,048-d float32
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class PredictOptions:
    """Every option of ``predict``, checked when built (the CLI's flags are these fields)."""

    out: str | None = None  # .csv, .jsonl or .parquet (format from the suffix)
    grid: str | None = None  # PNG of the first images with their predicted (and true) labels
    topk: int = 5
    with_embeddings: bool = False  # the embedding column (Parquet only)
    cache: str | None = None  # score rows from this cache; with images, extract the missing ones into it first
    split: str | None = None  # with a cache and no images: train, val, test, unlabeled or all (default all)
    batch_size: int = field(default=32, metadata={OUTSIDE_IDENTITY: True})
    workers: int | None = field(default=None, metadata={OUTSIDE_IDENTITY: True})  # decoder processes (default: sized to the machine)
    device: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})
    engine: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})
    precision: str | None = None  # default: the precision the head's cache was extracted in
    decode: str | None = None  # default: the decoding the head's cache recorded
    gpu_decoder: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})
    max_pixels: int = DEFAULT_MAX_PIXELS
    memory_budget: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})  # --cache: rows read and scored at once (pipeline/memory.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", check_budget(self.memory_budget))  # a number of GiB is accepted
        check_types(self)
        check_device(self)
        choose(self, "engine", ENGINES)
        choose(self, "precision", PRECISIONS)
        choose(self, "decode", DECODES)
        choose(self, "gpu_decoder", GPU_DECODERS)
        choose(self, "split", SPLITS)
        require(self.topk >= 1, f"--topk must be at least 1 (got {self.topk})")
        require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        require(self.workers is None or self.workers >= 0, f"--workers must be 0 or more (got {self.workers})")
        require(self.max_pixels >= 1, f"--max-pixels must be positive (got {self.max_pixels})")
        if self.out is not None:
            output_format(self.out, self.with_embeddings)
        require(not self.with_embeddings or self.out is not None, "--with-embeddings writes an embedding column: give --out FILE.parquet")


@dataclass
class PredictResult:
    """What a run predicted: ``rows`` (all of them without ``out``, else the first
    ``PREVIEW_ROWS``), how many in all, the files that failed, and where the outputs are."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    n: int = 0
    correct: int = 0  # among the rows whose true class is known
    known: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    out: str | None = None
    grid: str | None = None
    engine: str = ""
    source: str = "images"  # images, cache, or images+cache
    extracted: int = 0  # with images and a cache: files embedded into the cache first
    seconds: float = 0.0

    @property
    def csv(self) -> str | None:  # the earlier name of ``out``
        return self.out

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.known if self.known else None

    def to_dict(self, with_rows: bool = True) -> dict[str, Any]:
        out = {"n": self.n, "known": self.known, "accuracy": self.accuracy, "failures": [{"path": p, "reason": r} for p, r in self.failures],
               "out": self.out, "csv": self.out, "grid": self.grid, "engine": self.engine, "source": self.source, "extracted": self.extracted,
               "seconds": round(self.seconds, 3)}
        if with_rows:
            out["predictions"] = self.rows
            out["predictions_listed"] = len(self.rows)
        return out


# ----------------------------------------------------------------------------- what to predict


@dataclass
class Inputs:
    """The images named on the command line, as records readable from ``/`` (absolute paths,
    shard members, dataset items), with the true class where the folder or manifest names one."""

    records: list[ImageRecord]
    true: list[str]


def collect(inputs: Sequence[str | os.PathLike], classes: Sequence[str]) -> Inputs:
    """Every image named: files, folders, manifests, tar shards and datasets on disk."""
    known = set(classes)
    records: list[ImageRecord] = []
    true: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        text = str(item)
        if p.is_file() and not (is_manifest(p) or is_shards(p)):  # a file inside a folder named like a class: its true label
            records.append(ImageRecord(str(p.resolve()), -1, "", p.stat().st_size, 0))
            true.append(p.parent.name if p.parent.name in known else "")
            continue
        if not (p.exists() or text.startswith(("hf:", "torchvision:")) or is_shards(text)):
            raise DataError(f"{text!r} does not exist; pass image files, folders, manifests, tar shards or a dataset")
        scan = scan_source(item)
        for r in scan.records:
            name = scan.classes[r.label] if r.label >= 0 else ""
            container = r.container if r.container.startswith(("hf:", "torchvision:")) else (str(scan.root / r.container) if r.container else "")
            path = r.relpath if container.startswith(("hf:", "torchvision:")) else str(scan.root / r.relpath)
            records.append(ImageRecord(path, -1, "", r.size, 0, container, r.offset))
            true.append(name if name in known else "")
    if not records:
        raise DataError("no images to predict; pass image files or a folder with images")
    return Inputs(records, true)


def check_cache_for(loaded: LoadedHead, meta: dict[str, Any], cache: Path) -> None:
    """A cache of another backbone, weights, layer, preprocessing, precision, decoding or class
    set cannot be scored by (or extended for) this head: exit 5 with the reason."""
    loaded.check_cache(meta, cache)
    prov = loaded.provenance
    for key in ROW_NUMBERS:
        held, given = recorded(prov, key), recorded(meta, key)
        if held != given:
            raise IncompatibleError(f"head {str(loaded.path)!r} was fitted on {key}={held!r} rows but cache {str(cache)!r} holds {key}={given!r}; "
                                    f"score a cache extracted with --{key} {held}, or predict from the images")


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """The head over rows, batch after batch, into the output file (or memory), keeping the
    few rows a person or the grid needs and the accuracy where the true class is known."""

    def __init__(self, loaded: LoadedHead, opts: PredictOptions, out: Path | None, keep_all: bool):
        self.loaded, self.opts = loaded, opts
        self.classes = list(loaded.provenance["classes"])
        self.proba = head_scorer(loaded.head, len(self.classes))
        self.writer = PredictionWriter(out, self.classes, opts.with_embeddings) if out is not None else None
        self.keep = None if keep_all else PREVIEW_ROWS
        self.result = PredictResult()
        self.grid_rows: list[dict[str, Any]] = []

    def add(self, paths: Sequence[str], embeddings: np.ndarray, true: Sequence[str], readable: Sequence[tuple[Path, ImageRecord] | None] = ()) -> None:
        """Score one batch; ``readable``: where each row's image can be read (for the grid)."""
        if not len(paths):
            return
        top, top_p = score(self.proba(embeddings), self.opts.topk)
        batch = Scored(list(paths), top, top_p, list(true), embeddings if self.opts.with_embeddings else None)
        if self.writer is not None:
            self.writer.write(batch)
        r = self.result
        want = len(batch) if self.keep is None else max(0, self.keep - len(r.rows))
        room = max(0, GRID_IMAGES - len(self.grid_rows)) if readable else 0
        rows = Scored(batch.paths[: max(want, room)], top[: max(want, room)], top_p[: max(want, room)], batch.true[: max(want, room)]).rows(self.classes)
        r.rows += rows[:want]
        if room:
            self.grid_rows += [{**row, "image": where} for row, where in zip(rows, readable) if where is not None][:room]
        named = np.array([t != "" for t in batch.true])
        r.known += int(named.sum())
        if named.any():
            predicted = np.array(self.classes, dtype=object)[top[:, 0]]
            r.correct += int((predicted[named] == np.array(batch.true, dtype=object)[named]).sum())
        r.n += len(batch)

    def close(self) -> None:
        if self.writer is not None:
            self.result.out = str(self.writer.close())

    def abort(self, exc: BaseException) -> None:
        if self.writer is not None:
            self.writer.abort(exc)


# ----------------------------------------------------------------------------- entry points


def predict(head_path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), options: PredictOptions | dict | None = None, *,
            trust_hub: HubTrust = False, progress: Progress | None = None, **fields: Any) -> PredictResult:
    """Classify ``inputs`` (images: files, folders, manifests, shards, datasets) and/or the rows
    of ``options.cache`` with the head or fine-tuned model at ``head_path``; see the module doc.
    ``trust_hub``: consent to run a ``hub:`` backbone the file names (``--trust-hub``).

    Raises:
        UsageError, DataError, CacheError, IncompatibleError (a cache of another backbone),
        UntrustedCodeError, BackboneError, WeightsUnavailableError, Interrupted (nothing written).
    """
    t0 = time.perf_counter()
    opts = build(PredictOptions, options, **fields)
    loaded = load_head(head_path)
    require(bool(inputs) or opts.cache is not None, "predict needs images to classify, or --cache CACHE to score its rows")
    require(opts.split is None or not inputs, "--split chooses rows of the cache; with images, every image given is predicted")
    if not inputs:
        result = _predict_cache(loaded, Path(opts.cache), opts)
        logger.info(f"scored {result.result.n} {opts.split or 'all'} rows of {str(opts.cache)!r} without the backbone")
    else:
        result = _predict_images(loaded, inputs, opts, trust_hub, progress)
    if opts.grid is not None and result.grid_rows:
        result.result.grid = str(plot_grid(result.grid_rows, Path(opts.grid)))
    result.result.seconds = time.perf_counter() - t0
    return result.result


def predict_images(head_path: str | os.PathLike, inputs: list[str | os.PathLike], out_csv: str | os.PathLike | None = None,
                   grid_png: str | os.PathLike | None = None, topk: int = 5, batch_size: int = 32, workers: int | None = None,
                   device: str = "auto", trust_hub: HubTrust = False) -> PredictResult:
    """``predict`` with its most used options by name (the earlier signature)."""
    return predict(head_path, inputs, PredictOptions(out=None if out_csv is None else str(out_csv), grid=None if grid_png is None else str(grid_png),
                                                     topk=topk, batch_size=batch_size, workers=workers, device=device), trust_hub=trust_hub)


@dataclass
class _Run:
    result: PredictResult
    grid_rows: list[dict[str, Any]]


def _predict_cache(loaded: LoadedHead, cache: Path, opts: PredictOptions) -> _Run:
    """Score rows already embedded, chunk by chunk from one pinned version of the cache, in the
    order they are stored (sorting a million rows by path first would gather every chunk from
    all over the cache: 15 of 29 s at 100,000 x 2,048)."""
    w = world("cpu")
    with read_rows(cache) as table:
        check_cache_for(loaded, table.meta, cache)
        split = opts.split or "all"
        pick = (np.ones(len(table), bool) if split == "all" else table.labels < 0 if split == "unlabeled"
                else (table.split == split))
        rows = np.flatnonzero(pick)
        rows = rows[np.argsort(table.index_rows[rows], kind="stable")]  # storage order: each chunk one contiguous read, not a gather
        if not len(rows):
            raise UsageError(f"cache {str(cache)!r} holds no {split} rows to predict (splits there: "
                             f"{', '.join(sorted(set(table.split.tolist()) - {''}) or 'none recorded')})")
        lo, hi = _share(len(rows), w)  # torchrun: a contiguous share per rank, joined in rank order (the same file as one process)
        rows = rows[lo:hi]
        scorer = Scorer(loaded, opts, _rank_path(Path(opts.out), w) if opts.out else None, keep_all=opts.out is None)
        classes = table.classes
        labels = table.labels
        root = Path(table.meta.get("data_root") or "/")
        dim = int(table.meta["embed_dim"])
        try:
            stated = budget_bytes(opts.memory_budget)
            budget = working_budget(stated, table.nbytes)  # the table's paths, labels and hashes count against it
            step = score_chunk_rows(budget, dim, len(classes), rows=len(rows), command="predict", most=CACHE_CHUNK, held=table.nbytes, stated=stated)
            for a in range(0, len(rows), step):
                idx = rows[a : a + step]
                X = np.empty((len(idx), dim), dtype=np.dtype(table.meta.get("dtype", "float32")))
                table.snapshot.read_into(X, table.index_rows[idx], np.arange(len(idx)))  # ascending ids: decoded straight into X
                paths = table.paths[idx].tolist()
                readable = [(root, ImageRecord(p, -1, "", 0, 0)) for p in paths[:GRID_IMAGES]] if opts.grid and len(scorer.grid_rows) < GRID_IMAGES else ()
                scorer.add(paths, X, [classes[y] if y >= 0 else "" for y in labels[idx].tolist()], readable)
        except BaseException as exc:
            scorer.abort(exc)
            raise
        scorer.close()
    scorer.result.source = "cache"
    return _merge_ranks(_Run(scorer.result, scorer.grid_rows), opts, w)


def _predict_images(loaded: LoadedHead, inputs: Sequence[str | os.PathLike], opts: PredictOptions, trust_hub: HubTrust, progress: Progress | None) -> _Run:
    """Images through the backbone's engine and the head, streamed into the output."""
    if opts.cache is not None:
        return _predict_through_cache(loaded, inputs, Path(opts.cache), opts, trust_hub)
    prov = loaded.provenance
    given = collect(inputs, prov["classes"])
    dev = resolve_device(opts.device)
    w = world(dev.type)
    dev = rank_device(dev, w)
    precision = resolve_precision(opts.precision or prov.get("precision") or "fp32", dev)
    decode = resolve_decode(opts.decode or prov.get("decode") or "exact", dev)
    lo, hi = _share(len(given.records), w)
    records, true = given.records[lo:hi], given.true[lo:hi]
    backbone = loaded.load_backbone(trust_hub)
    read = ReadOptions(opts.batch_size, opts.workers, opts.max_pixels, decode, opts.gpu_decoder, hash_files=False)
    batches = open_reader(Path("/"), records, [backbone.preprocessing], read, dev)
    mapper = build_mapper(backbone, opts.engine, dev, precision, opts.batch_size, len(records), engines_home(prov))
    out = _rank_path(Path(opts.out), w) if opts.out is not None else None
    scorer = Scorer(loaded, opts, out, keep_all=opts.out is None)
    scorer.result.engine = mapper.engine.name
    failures: list[tuple[str, str]] = []
    clock = StageClock()
    done = 0
    t0 = time.perf_counter()

    def consume(_: int, batch: DecodedBatch, rows_of: Callable[[], np.ndarray] | None) -> None:
        failures.extend((records[i].relpath, reason) for i, reason in batch.failures)
        if rows_of is not None:
            readable = [(Path("/"), records[i]) for i in batch.positions] if opts.grid and len(scorer.grid_rows) < GRID_IMAGES else ()
            scorer.add([records[i].relpath for i in batch.positions], rows_of(), [true[i] for i in batch.positions], readable)

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress and w.is_main:
            progress(done, len(records), time.perf_counter() - t0)

    feed = Feed(batches, dev, [backbone.preprocessing], read, bool(records))
    try:
        with sigterm_as_interrupt():
            run_batches([mapper], feed, consume, dev, clock, on_batch)
    except KeyboardInterrupt as exc:
        scorer.abort(exc)
        raise Interrupted(f"interrupted after {scorer.result.n} of {len(given.records)} predictions; nothing was written "
                          "(outputs appear whole or not at all): run the same command again") from None
    except BaseException as exc:
        scorer.abort(exc)
        raise
    finally:
        feed.close(clock)
    scorer.close()
    scorer.result.failures = failures
    return _merge_ranks(_Run(scorer.result, scorer.grid_rows), opts, w)


def _predict_through_cache(loaded: LoadedHead, inputs: Sequence[str | os.PathLike], cache: Path, opts: PredictOptions, trust_hub: HubTrust) -> _Run:
    """Images and a cache: embed into the cache only the files it lacks (``extract``'s own run:
    incremental, crash-safe, the head's backbone and settings; files gone from the source lose
    their rows, as extract does), then score every image of the source from the cache."""
    from .extract import extract_many

    prov = loaded.provenance
    if len(inputs) != 1 or (Path(inputs[0]).is_file() and not (is_manifest(inputs[0]) or is_shards(inputs[0]))):
        raise UsageError("with --cache, pass one image folder, manifest, shard set or dataset: the cache holds the rows of one data source")
    if cache.exists():
        with read_rows(cache) as table:
            check_cache_for(loaded, table.meta, cache)
    options = {"weights": prov.get("weights_spec") or prov["weights"], "seed": int(prov.get("seed") or 0), "dtype": prov.get("dtype") or "float32",
               "precision": prov.get("precision") or "fp32", "decode": prov.get("decode") or "exact", "batch_size": opts.batch_size,
               "workers": opts.workers, "device": opts.device, "engine": opts.engine, "gpu_decoder": opts.gpu_decoder, "max_pixels": opts.max_pixels}
    if prov.get("layer"):
        options.update(layers=(prov["layer"],), layer_pool=prov.get("layer_pool") or "avg")
    if prov.get("token_pool"):
        options["token_pool"] = prov["token_pool"]
    check_artifact_backbone(prov["model"], loaded.path, trust_hub)  # its code runs in the extract below only with consent
    (summary,) = extract_many(inputs[0], [prov["model"]], [cache], options, trust_hub=True)
    run = _predict_cache(loaded, cache, build(PredictOptions, opts, split="all"))
    run.result.source, run.result.extracted = "images+cache", summary.new
    run.result.failures = list(summary.failures)
    logger.info(f"embedded {summary.new} new image(s) into {str(cache)!r} ({summary.cached} already there), then scored {run.result.n} rows from it")
    return run


def _share(n: int, w: World) -> tuple[int, int]:
    """This rank's contiguous share of ``n`` items (joined in rank order, outputs keep input order)."""
    return n * w.rank // w.size, n * (w.rank + 1) // w.size


def _rank_path(out: Path, w: World) -> Path:
    return out if not w.enabled else out.with_name(f".{out.name}.rank{w.rank}-of-{w.size}{out.suffix}")


def _merge_ranks(run: _Run, opts: PredictOptions, w: World) -> _Run:
    """torchrun: rank 0 joins the ranks' files in rank order (= input order) and their counts."""
    if not w.enabled:
        return run
    r = run.result
    shares = w.gather({"n": r.n, "known": r.known, "correct": r.correct, "failures": r.failures, "rows": r.rows, "grid": run.grid_rows})
    if w.is_main:
        r.n, r.known, r.correct = (sum(s[k] for s in shares) for k in ("n", "known", "correct"))
        r.failures = [f for s in shares for f in s["failures"]]
        keep = None if opts.out is None else PREVIEW_ROWS
        r.rows = [row for s in shares for row in s["rows"]][:keep]
        run.grid_rows = [row for s in shares for row in s["grid"]][:GRID_IMAGES]
        if opts.out is not None:
            out = Path(opts.out)
            parts = [_rank_path(out, World(k, w.size)) for k in range(w.size)]
            concatenate(parts, out, output_format(out))
            for part in parts:
                part.unlink(missing_ok=True)
            r.out = str(out)
    w.barrier()
    return run


# ----------------------------------------------------------------------------- the picture


GRID_CELL_INCHES = 2.0  # each picture's cell; its title is wrapped to this width
GRID_TITLE_POINTS = 8.0


def _grid_title(r: dict[str, Any]) -> str:
    """``predicted p`` and ``(true t)``, each wrapped to the cell's width (long class names
    ran into the neighbouring titles and past the figure's edge)."""
    import textwrap

    chars = max(8, int(GRID_CELL_INCHES * 72 / (0.62 * GRID_TITLE_POINTS)))  # DejaVu Sans: about 0.6 em a character
    lines = [f"{r['predicted']} {r['probability']:.2f}"] + ([f"(true {r['true']})"] if r["true"] else [])
    return "\n".join(textwrap.fill(line, chars, break_long_words=True) for line in lines)


@literal_text
def plot_grid(rows: list[dict[str, Any]], path: Path, max_images: int = GRID_IMAGES) -> Path:
    """Images with predicted (and true) labels, green when right, red when wrong. Each row of
    the grid gets the height its tallest title needs (one row included: two-line titles)."""
    from .heads import pyplot, save_figure
    from .images import DecodeError, decode_image, read_bytes, read_record

    plt = pyplot()

    rows = rows[:max_images]
    cols = max(1, min(8, len(rows)))
    nrows = max(1, (len(rows) + cols - 1) // cols)
    titles = [_grid_title(r) for r in rows]
    lines = [max((t.count("\n") + 1 for t in titles[k * cols : (k + 1) * cols]), default=1) for k in range(nrows)]
    title_inches = [n * GRID_TITLE_POINTS * 1.3 / 72 + 0.08 for n in lines]  # each grid row's title height, with its gap
    fig, axes = plt.subplots(nrows, cols, figsize=(GRID_CELL_INCHES * cols, nrows * GRID_CELL_INCHES + sum(title_inches) + 0.1),
                             squeeze=False, gridspec_kw={"height_ratios": [GRID_CELL_INCHES + t for t in title_inches]})
    for ax in axes.flat:
        ax.axis("off")
    for ax, r, title in zip(axes.flat, rows, titles):
        try:  # a row of this run knows its record (shard members too); a caller's row has its path
            ax.imshow(decode_image(read_record(*r["image"]) if "image" in r else read_bytes(Path(r["path"]))))
        except DecodeError:
            continue  # gone or unreadable since it was scored: its cell stays empty
        color = "black" if not r["true"] else ("green" if r["true"] == r["predicted"] else "red")
        ax.set_title(title, fontsize=GRID_TITLE_POINTS, color=color)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
