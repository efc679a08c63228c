"""featcache command line: parse options, call one library function, print a summary.

Exit codes: 0 ok; 1 internal error (a bug: rerun with --debug); 2 usage error (bad option,
path, model or config); 3 finished but some inputs failed; 4 another process holds the
lock; 5 incompatible, corrupt or foreign cache/artifact; 6 resource unavailable
(pretrained weights offline, disk full, read-only folder); 130 interrupted (finished work
was committed).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer

EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 internal error (rerun with --debug) · 2 usage error · "
    "3 finished but some inputs failed · 4 lock held by another process · "
    "5 incompatible/corrupt/foreign cache or artifact · 6 resource unavailable (weights offline, disk full, read-only) · "
    "130 interrupted (finished work committed)."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run frozen image backbones once, cache embeddings in HDF5, train heads on the cache. " + EXIT_CODES_HELP,
    epilog=EXIT_CODES_HELP,
)
_state: dict[str, Any] = {"debug": False, "json": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also append every message, with timestamps, to this file (for cron)."),
    log_json: bool = typer.Option(False, "--log-json", help="Write the log as JSON lines (to --log-file, else stderr)."),
) -> None:
    from pipeline import logs

    _state["debug"] = debug
    try:
        logs.configure(log_file, log_json)
    except OSError as exc:
        typer.echo(f"error: --log-file {str(log_file)!r} cannot be opened ({exc.strerror}); choose a writable path", err=True)
        raise typer.Exit(2)


def _begin(as_json: bool, quiet: bool = False) -> None:
    """Per command: --json owns stdout; --json/--quiet leave only warnings and errors on stderr."""
    from pipeline import logs

    _state["json"] = as_json
    logs.quiet_console(quiet or as_json or _torchrun_worker())


def _torchrun_worker() -> bool:
    """Under torchrun only rank 0 reports; the other ranks stay silent."""
    return int(os.environ.get("RANK", "0")) != 0


def command(fn: Callable[..., int]) -> Callable[..., None]:
    """Register ``fn`` as a command whose return value is the exit code, and map every
    error to its documented exit code with a one-line message (traceback only with --debug)."""
    from pipeline.errors import ExitCode, FeatcacheError
    from pipeline.interrupts import sigterm_as_interrupt

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            with sigterm_as_interrupt():  # SIGTERM (cron timeouts, kill) stops like Ctrl-C: commit, then exit 130
                code = fn(*args, **kwargs)
        except FeatcacheError as exc:
            if _state["debug"]:
                traceback.print_exc()
            _fail(f"error: {exc}")
            if _state["json"]:
                _emit_json({"error": str(exc), "error_type": type(exc).__name__, "exit_code": exc.exit_code})
            code = exc.exit_code
        except KeyboardInterrupt:
            _fail("interrupted")
            code = ExitCode.INTERRUPTED
        except Exception as exc:  # a bug: say so briefly, unless --debug
            if _state["debug"]:
                traceback.print_exc()
            _fail(f"internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug and report it)")
            code = ExitCode.INTERNAL
        raise typer.Exit(code or 0)

    return app.command(epilog=EXIT_CODES_HELP)(wrapper)


def _err(msg: str) -> None:
    """A message for people (stderr unless --quiet/--json) and for --log-file."""
    from pipeline import logs

    logs.info(msg)


def _fail(msg: str) -> None:
    from pipeline import logs

    logs.error(msg)


def _emit_json(obj: dict[str, Any]) -> None:
    """The one JSON object on stdout (rank 0's alone under torchrun)."""
    if not _torchrun_worker():
        typer.echo(json.dumps(obj, indent=None, default=str))


def _options(cls: type, flags: dict[str, Any], **renamed: Any) -> Any:
    """A stage's options object from a command's flags: every field of ``cls`` is taken from
    the flag of the same name (``renamed`` for the few whose parameter name differs), so a
    new option is one field and one flag."""
    from dataclasses import fields

    return cls(**{f.name: renamed[f.name] if f.name in renamed else flags[f.name] for f in fields(cls) if f.name in flags or f.name in renamed})


class _Progress:
    """One updating line on a terminal (stderr); silent when not a TTY or --quiet."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty() and sys.stdout.isatty()
        self.label = label
        self._last = 0.0

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if not self.enabled or (time.monotonic() - self._last < 0.2 and done < total):
            return
        self._last = time.monotonic()
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {rate:6.1f} img/s  ETA {eta:5.0f}s ")
        sys.stderr.flush()
        if done >= total:
            sys.stderr.write("\n")


@command
def extract(
    data_dir: Path = typer.Argument(..., help="Image folder: class sub-folders (ImageFolder), train/ val/ [test/] roots, or a flat unlabeled folder."),
    models: list[str] = typer.Option(..., "--model", "-m", help="torchvision model name (see `models`) or hub:REPO_OR_DIR:ENTRY; repeat it to extract several backbones in one pass (each file read and decoded once)."),
    weights: str = typer.Option("DEFAULT", "--weights", "-w", help="DEFAULT, a weights name (e.g. IMAGENET1K_V2), none (seeded random init), or a state_dict PATH."),
    outs: Optional[list[Path]] = typer.Option(None, "--out", "-o", help="Cache file (one per --model, in order); default cache/<model>__<weights>__<root>-<hash>.h5."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per backbone forward."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Decoder processes (default: none on a CPU of <= 2 cores, where decoding in-process measured faster; a quarter of the cores above; half on CUDA)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored embedding dtype: float32 or float16."),
    layout: str = typer.Option("auto", "--layout", help="auto, imagefolder, split (train/val/test) or flat (unlabeled)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none (recorded in the cache)."),
    commit_every: int = typer.Option(1000, "--commit-every", help="Commit a part after this many images (bounds work lost to a crash)."),
    commit_seconds: float = typer.Option(60.0, "--commit-seconds", help="...or after this many seconds."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Larger images are recorded as decompression bombs and skipped."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (bf16 where supported, else fp16); same as --precision bf16/fp16."),
    engine: str = typer.Option("auto", "--engine", help="auto (the engine measured fastest on this machine, once the job repays measuring; else eager), eager, compile (torch.compile), onnxruntime or openvino (optional extras); every engine is checked against eager."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (exact), bf16/fp16 (only where the hardware runs it natively, else fp32 with a message), auto (bf16 where native)."),
    decode: str = typer.Option("exact", "--decode", help="exact; draft: JPEGs decoded at a reduced DCT scale still >= the resize target (several times faster on large photos); gpu: JPEGs decoded by nvJPEG on CUDA. Both change pixels slightly, are recorded in the cache and never mixed with exact rows."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same cache to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (with several --model: {\"caches\": [...]})."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary text (errors still go to stderr)."),
) -> int:
    """Embed every image not yet in the cache (incremental, crash-safe)."""
    from pipeline.errors import UsageError
    from pipeline.extract import ExtractOptions, extract_many

    _begin(as_json, quiet)
    if outs and len(outs) != len(models):
        raise UsageError(f"--out was given {len(outs)} times for {len(models)} --model values; give one --out per --model, or none")
    summaries = extract_many(data_dir, models, outs or None, _options(ExtractOptions, locals()), wait=wait,
                             progress=_Progress(not quiet and not as_json, "extract"), log=_err)
    code = 3 if any(s.failed for s in summaries) else 0
    if as_json:
        _emit_json({**summaries[0].to_dict(), "exit_code": code} if len(summaries) == 1 else {"caches": [s.to_dict() for s in summaries], "exit_code": code})
        return code
    for summary in summaries:
        _err(
            f"{summary.cache}: {summary.new} new, {summary.cached} cached, {summary.failed} failed, {summary.removed} removed; "
            f"{summary.rows} rows x {summary.embed_dim} ({summary.model}, {summary.weights}, {summary.engine} {summary.precision}{'' if summary.decode == 'exact' else ', ' + summary.decode + ' decode'}) in {summary.seconds:.1f}s"
            + (f", {summary.images_per_s:.1f} img/s" if summary.new else "")
        )
        for path, reason in summary.failures[:20]:
            _err(f"  failed: {path}: {reason}")
        if summary.failed > 20:
            _err(f"  ... and {summary.failed - 20} more (see `status` or --json)")
    return code


@command
def engines(
    model: str = typer.Option(..., "--model", "-m", help="torchvision model name or hub:REPO_OR_DIR:ENTRY."),
    weights: str = typer.Option("DEFAULT", "--weights", "-w", help="As for extract (the measurement is per model and weights)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, fp16 or auto, as for extract."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="As for extract (the choice is per batch size)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Folder of the caches whose extracts should use the choice (default: cache/)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> int:
    """Measure every engine available here on this model and remember the fastest for `extract --engine auto`."""
    from pipeline.extract import measure_engines

    _begin(as_json)
    result = measure_engines(model, weights, precision=precision, batch_size=batch_size, device=device, seed=seed, cache_dir=cache_dir, log=_err)
    if as_json:
        _emit_json(result)
        return 0
    for name, rate in result["images_per_s"].items():
        typer.echo(f"{name:<12} {rate:8.1f} img/s" if rate else f"{name:<12}      n/a  ({result['skipped'].get(name, '')})")
    typer.echo(f"fastest: {result['engine']} ({result['precision']}, batch {batch_size}); `extract --engine auto` uses it from now on ({result['choice_file']})")
    return 0


@command
def status(
    target: Path = typer.Argument(..., help="A cache (.h5), a head or fine-tuned model (.pt), or a job file (.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> int:
    """What a cache holds, what a head/model was fitted on and whether it is stale, or what a job would do."""
    from pipeline.errors import CacheError

    _begin(as_json)
    if target.suffix == ".toml":
        from pipeline.jobs import run_job
        from pipeline.status import format_job_plan

        plan = run_job(target, dry_run=True)
        typer.echo(json.dumps(plan.to_dict(), default=str) if as_json else format_job_plan(plan))
        return 0
    if target.suffix in (".pt", ".pth"):
        from pipeline.status import artifact_status, format_artifact_status

        info = artifact_status(target)
        typer.echo(json.dumps(info, default=str) if as_json else format_artifact_status(info))
        return 0
    from pipeline.status import cache_status, format_cache_status

    if target.is_dir() and not target.name.endswith(".parts"):
        raise CacheError(f"{str(target)!r} is a folder; pass a cache .h5 file, a head/model .pt file or a job .toml file")
    info = cache_status(target)
    typer.echo(json.dumps(info, default=str) if as_json else format_cache_status(info))
    return 0


@command
def run(
    job: Path = typer.Argument(..., help="Job file (TOML): data, backbones, heads, optional finetune; see the README."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a job-file value: KEY=VALUE, e.g. finetune.epochs=3 or backbones.0.batch_size=16 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Refit every head and restart every fine-tune (extraction stays incremental)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what is stale and would run (same as `status JOB`)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the job's device: auto, cpu or cuda[:N]."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Override the job's decoder processes."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for locks held by other writers (the job, a cache, a head, a model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr (the --log-file still gets everything)."),
) -> int:
    """Run a job file, doing only what is stale (for cron): extract, fit heads, fine-tune."""
    from pipeline.jobs import run_job
    from pipeline.status import format_job_plan

    _begin(as_json, quiet)
    result = run_job(job, set_ or [], force=force, dry_run=dry_run, wait=wait, device=device, workers=workers, log=_err,
                     progress=lambda label: _Progress(not quiet and not as_json, label))
    code = 3 if result.failed_inputs else 0
    if as_json:
        _emit_json({**result.to_dict(), "exit_code": code})
    elif dry_run:
        typer.echo(format_job_plan(result))
    else:
        ran = [s for s in result.steps if s.action != "skip"]
        _err(f"[{result.name}] done in {result.seconds:.1f}s: {len(ran)} step(s) ran, {len(result.steps) - len(ran)} up to date"
             + (f"; {result.failed_inputs} input file(s) failed (exit 3)" if result.failed_inputs else "") + f"; report {result.report}")
    return code


def _floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    from pipeline.errors import UsageError

    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated numbers, e.g. {option} 512,256") from None


def _print_metrics(metrics: dict[str, Any]) -> None:
    from pipeline.heads import format_metrics

    for split in ("val", "test", "all"):
        if split in metrics:
            _err(format_metrics(split, metrics[split]))


@command
def fit_head(
    cache: Path = typer.Argument(..., help="Cache .h5 written by extract."),
    clf: str = typer.Option("logreg", "--clf", help="logreg, linear, mlp or knn."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Head file; default heads/<cache>.<clf>.head.pt."),
    C: Optional[float] = typer.Option(None, "--C", help="logreg: fix C (default: chosen from 1e-6 ... 1e4 along a warm-started path, coarse to fine)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="logreg: solver threads (default: torch's, all cores)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="torch heads: maximum epochs (default 100, early stopping on val loss)."),
    lr: Optional[str] = typer.Option(None, "--lr", help="torch heads: AdamW learning rate; several (1e-3,3e-3,1e-2) train a grid in one read and keep the best on val."),
    weight_decay: Optional[str] = typer.Option(None, "--weight-decay", help="torch heads: AdamW weight decay; several (0,1e-4,1e-3) join the grid."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="torch heads: minibatch size."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="mlp: hidden sizes, e.g. 512,256; several architectures with ':' (512,256:1024) join the grid."),
    dropout: Optional[str] = typer.Option(None, "--dropout", help="mlp: dropout per hidden layer, e.g. 0.25,0.5."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="torch heads: label smoothing."),
    schedule: str = typer.Option("cosine", "--schedule", help="torch heads: cosine or step."),
    patience: Optional[int] = typer.Option(None, "--patience", help="torch heads: early-stopping patience in epochs (0 = off)."),
    class_weight: Optional[str] = typer.Option(None, "--class-weight", help="balanced: weight classes inversely to their frequency."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share when the data is not pre-split (hash of path: stable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and the head."),
    stream: bool = typer.Option(False, "--stream", help="torch heads: stream the cache in chunks instead of loading it."),
    memory_budget: float = typer.Option(4.0, "--memory-budget", help="GiB of embeddings to load before streaming automatically."),
    k: Optional[str] = typer.Option(None, "--k", help="knn: neighbours, one count or several (e.g. 10,20,100,200: scored in one pass, the best on val kept; default 20)."),
    select_on: str = typer.Option("cv", "--select-on", help="logreg: choose C by cross-validation on the training rows (cv) or on the validation rows (val)."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same head file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the metrics on stdout."),
) -> int:
    """Fit a head on a cache, evaluate it on val/test, save it with its provenance and reports."""
    from pipeline.heads import FitOptions
    from pipeline.heads import fit_head as run_fit

    _begin(as_json)
    hidden = tuple(tuple(int(h) for h in _floats(arch, "--hidden")) for arch in hidden.split(":")) if hidden else None
    lr, weight_decay = _floats(lr, "--lr"), _floats(weight_decay, "--weight-decay")
    dropout = _floats(dropout, "--dropout")
    k = tuple(int(n) for n in _floats(k, "--k")) if k else None
    r = run_fit(cache, _options(FitOptions, locals()), out, wait=wait)
    if as_json:
        _emit_json({"head": r.head_path, "clf": r.kind, "cache": r.cache, "n_train": r.n_train, "n_val": r.n_val, "n_test": r.n_test,
                    "fit_seconds": r.seconds, "metrics": r.metrics, "reports": r.reports})
    else:
        _err(f"{r.kind} head fitted on {r.n_train} rows in {r.seconds:.1f}s -> {r.head_path}")
        _print_metrics(r.metrics)
        for name, path in r.reports.items():
            _err(f"  {name}: {path}")
    return 0


@command
def evaluate(
    head: Path = typer.Argument(..., help="Head file written by fit-head."),
    cache: Path = typer.Option(..., "--cache", help="A cache of the same backbone, weights and classes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the metrics on stdout."),
) -> int:
    """Re-score a saved head on a compatible cache."""
    from pipeline.heads import evaluate_head

    _begin(as_json)
    result = evaluate_head(head, cache)
    if as_json:
        _emit_json(result)
    else:
        _print_metrics(result)
    return 0


@command
def predict(
    model_path: Path = typer.Argument(..., help="Head file written by fit-head."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV of path, predicted, probability, top-k, true."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid of images with predicted (and true) labels."),
    topk: int = typer.Option(5, "--topk", help="How many classes in the top-k column."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> int:
    """Classify new images with a saved head (runs the head's backbone; no cache needed)."""
    from pipeline.predict import predict_images

    _begin(as_json)
    r = predict_images(model_path, images, out, grid, topk=topk, device=device)
    code = 3 if r.failures else 0
    if as_json:
        _emit_json({"predictions": r.rows, "failures": [{"path": p, "reason": m} for p, m in r.failures], "csv": r.csv, "grid": r.grid, "exit_code": code})
    else:
        for row in r.rows[:20]:
            _err(f"{row['path']}: {row['predicted']} ({row['probability']:.3f})" + (f"  true={row['true']}" if row["true"] else ""))
        if len(r.rows) > 20:
            _err(f"... {len(r.rows) - 20} more" + (f" in {r.csv}" if r.csv else " (use --out CSV)"))
        known = [row for row in r.rows if row["true"]]
        if known:
            _err(f"accuracy on {len(known)} labelled images: {sum(row['true'] == row['predicted'] for row in known) / len(known):.4f}")
        for path, reason in r.failures:
            _err(f"  failed: {path}: {reason}")
        for name, value in (("csv", r.csv), ("grid", r.grid)):
            if value:
                _err(f"  {name}: {value}")
    return code


@command
def compare(
    caches: list[Path] = typer.Argument(..., help="Caches of different backbones/weights over the same data (or one cache, to compare heads)."),
    clf: list[str] = typer.Option(["logreg"], "--clf", help="Head to fit on each cache: logreg, linear, mlp or knn; repeat it to compare heads."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share (same hash split for every cache)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and the heads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> int:
    """Which backbone transfers best, and which head: every --clf on every cache, ranked."""
    from pipeline.heads import FitOptions, compare_caches

    _begin(as_json)
    flags = locals()
    result = compare_caches(caches, [_options(FitOptions, {**flags, "clf": name}) for name in clf])
    if as_json:
        _emit_json(result)
    else:
        _err(f"{'rank':>4}  {'backbone / head':<36} {'accuracy':>8} {'macro_f1':>8} {'fit s':>7} {'dim':>6}")
        for i, r in enumerate(result["leaderboard"], 1):
            _err(f"{i:>4}  {r['name']:<36} {r['accuracy']:8.4f} {r['macro_f1']:8.4f} {r['fit_seconds']:7.1f} {r['embed_dim']:>6}")
        _err(f"  chart: {result['chart_png']}")
    return 0


@command
def finetune(
    head: Path = typer.Argument(..., help="Head written by fit-head (or a model written by finetune): names the backbone, classes, split and data."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Fine-tuned model file; default <head>.finetuned.pt beside the head. Its checkpoint is <out>.ckpt."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (default: the one the head's cache was extracted from)."),
    head_mode: Optional[str] = typer.Option(None, "--head", help="from (default): start from the fitted head; new: a fresh linear layer."),
    unfreeze: Optional[str] = typer.Option(None, "--unfreeze", help="all (default) or last:N backbone blocks (last:0 trains only the head)."),
    augment: Optional[str] = typer.Option(None, "--augment", help="none, basic (default: RandomResizedCrop + flip), rotate (+/-15 deg), strong (+TrivialAugment)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (default, momentum 0.9, nesterov) or adamw."),
    lr_backbone: Optional[float] = typer.Option(None, "--lr-backbone", help="Backbone learning rate (sgd 1e-3, adamw 1e-5)."),
    lr_head: Optional[float] = typer.Option(None, "--lr-head", help="Head learning rate (sgd 1e-2, adamw 1e-3)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="sgd momentum (0.9)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay on weights, not biases/norms (sgd 1e-4, adamw 0.05)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default), step (x0.1 at 1/3 and 2/3) or constant, after warmup."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Fraction of training in linear warmup (0.1)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (10). 0 evaluates the assembled model; on --resume, more epochs continue training."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per step (32)."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Gradient accumulation: optimiser step every N batches (1)."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Clip the gradient norm (0 = off)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing (0)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format (on by default)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for order, augmentation and new layers (0)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Decoder processes (default as for extract: none on a CPU of <= 2 cores, where training measured faster without; more on bigger machines and CUDA)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>.ckpt (bit-for-bit); options left out are taken from it."),
    force: bool = typer.Option(False, "--force", help="Start over even though <out>.ckpt exists."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same model file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or per-epoch lines."),
) -> int:
    """Fine-tune the head's backbone end to end (BatchNorm frozen), starting from the head."""
    from pipeline.finetune import FinetuneOptions, run_finetune

    _begin(as_json, quiet)
    options = _options(FinetuneOptions, locals(), head=head_mode)
    r = run_finetune(head, out, data_dir=data, options=options, resume=resume, force=force, wait=wait,
                     progress=_Progress(not quiet and not as_json, "train"), log=_err)
    code = 3 if r.failures else 0
    if as_json:
        _emit_json({**r.to_dict(), "exit_code": code})
    else:
        _err(f"{r.model_path}: best epoch {r.best_epoch} of {r.epochs_done} in {r.seconds:.1f}s (checkpoint {r.checkpoint})")
        _print_metrics(r.metrics)
        for name, path in r.reports.items():
            _err(f"  {name}: {path}")
        for path, reason in r.failures[:20]:
            _err(f"  failed: {path}: {reason}")
    return code


@command
def models(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> int:
    """List the torchvision classification models that --model accepts."""
    from pipeline.backbones import available_models

    names = available_models()
    typer.echo(json.dumps(names) if as_json else "\n".join(names))
    return 0


@command
def demo(
    workdir: Path = typer.Option(Path("demo_out"), "--workdir", help="Where the demo data and cache go."),
    model: str = typer.Option("resnet18", "--model", "-m", help="Backbone for the demo."),
    weights: str = typer.Option("none", "--weights", "-w", help="none works offline; DEFAULT needs the internet once."),
    finetune_epochs: int = typer.Option(1, "--finetune-epochs", help="Epochs of end-to-end fine-tuning (0 skips the stage)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> int:
    """End to end on the embedded demo data: extract -> status -> fit-head -> finetune -> predict."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.finetune import run_finetune
    from pipeline.heads import fit_head as run_fit
    from pipeline.predict import predict_images
    from pipeline.status import cache_status, format_cache_status

    _begin(as_json)
    data = write_digits(workdir / "digits")
    cache = workdir / "cache" / f"digits_{model}_{weights}.h5"
    _err(f"[1/5] extract {data} with {model} (weights {weights}) -> {cache}")
    summary = run_extract(data, model, weights, cache, progress=_Progress(not as_json, "extract"), log=_err)
    _err(f"      {summary.new} new, {summary.cached} cached, {summary.failed} failed in {summary.seconds:.1f}s")
    _err("[2/5] what the cache holds")
    info = cache_status(cache)
    if not as_json:
        _err(format_cache_status(info))
    head = workdir / "heads" / f"digits_{model}_{weights}.logreg.head.pt"
    _err(f"[3/5] fit-head --clf logreg -> {head}")
    fit = run_fit(cache, "logreg", head)
    _err(f"      fitted on {fit.n_train} rows in {fit.seconds:.1f}s")
    if not as_json:
        _print_metrics(fit.metrics)
    predictor, tuned = head, None
    if finetune_epochs > 0:
        model_path = workdir / "models" / f"digits_{model}_{weights}.finetuned.pt"
        _err(f"[4/5] finetune {finetune_epochs} epoch(s) end to end, BatchNorm frozen, from the logreg head -> {model_path}")
        tuned = run_finetune(head, model_path, options={"epochs": finetune_epochs, "augment": "light"}, force=True,
                             progress=_Progress(not as_json, "train"), log=_err)
        _err(f"      best epoch {tuned.best_epoch} (0 = the head as fitted); val accuracy {tuned.metrics['val']['accuracy']:.4f} in {tuned.seconds:.1f}s")
        predictor = Path(tuned.model_path)
    else:
        _err("[4/5] finetune skipped (--finetune-epochs 0)")
    picks = [p for c in sorted(data.iterdir()) for p in sorted(c.iterdir())[:2]]
    _err(f"[5/5] predict {len(picks)} images with {predictor.name} -> {workdir / 'predictions.csv'}, grid {workdir / 'predictions.png'}")
    pred = predict_images(predictor, picks, workdir / "predictions.csv", workdir / "predictions.png")
    right = sum(r["true"] == r["predicted"] for r in pred.rows)
    _err(f"      {right}/{len(pred.rows)} correct")
    if as_json:
        _emit_json({"extract": summary.to_dict(), "status": info, "fit_head": {"head": fit.head_path, "metrics": fit.metrics},
                    "finetune": tuned.to_dict() if tuned else None,
                    "predict": {"csv": pred.csv, "grid": pred.grid, "correct": right, "n": len(pred.rows)}})
    return 0


def main() -> None:
    """Console-script entry point (``featcache``), identical to ``python cli.py``."""
    app()


if __name__ == "__main__":
    main()
