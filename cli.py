"""featcache command line: parse options, call one library function, print a summary.

Exit codes: 0 ok; 1 internal error (a bug: rerun with --debug); 2 usage error (bad option,
path, model or config); 3 finished but some inputs failed; 4 another process holds the
lock; 5 incompatible, corrupt or foreign cache/artifact; 6 resource unavailable
(pretrained weights offline, disk full, read-only folder); 7 training diverged (lower the
learning rate); 8 `audit --fail-on` found what it names; 130 interrupted (finished work was committed).

Every command takes --json (one JSON object on stdout) and --quiet (no progress or summary
on stderr); name-like values (--clf LogReg, --weights None, --device CPU) are read
case-insensitively and kept in their canonical spelling (pipeline/choices.py).
"""
from __future__ import annotations

import enum
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import typer

from pipeline.choices import (
    AUGMENT_PRESETS,
    DECODES,
    DTYPES,
    ENGINES,
    GPU_DECODERS,
    HEAD_KINDS,
    HEAD_MODES,
    LABEL_METHODS,
    LAYOUTS,
    MAP_METHODS,
    MODEL_EXPORT_FORMATS,
    NEAR_DUPLICATE_SEARCH,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    SELECT_ON,
    TOKEN_POOLS,
    TORCH_SCHEDULES,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 internal error (rerun with --debug) · 2 usage error · "
    "3 finished but some inputs failed · 4 lock held by another process · "
    "5 incompatible/corrupt/foreign cache or artifact · 6 resource unavailable (weights offline, disk full, read-only) · "
    "7 training diverged (lower the learning rate) · 8 audit --fail-on found what it names · 130 interrupted (finished work committed)."
)

# Choices, listed by --help and matched case-insensitively (the library applies the same rule).
Layout = Literal[LAYOUTS]
Dtype = Literal[DTYPES]
Engine = Literal[ENGINES]
Precision = Literal[PRECISIONS]
Decode = Literal[DECODES]
GpuDecoder = Literal[GPU_DECODERS]
TokenPool = Literal[TOKEN_POOLS]
Clf = Literal[HEAD_KINDS]
HeadSchedule = Literal[TORCH_SCHEDULES]
SelectOn = Literal[SELECT_ON]
HeadMode = Literal[HEAD_MODES]
Augment = Literal[AUGMENT_PRESETS]
Optimizer = Literal[OPTIMIZERS]
Schedule = Literal[SCHEDULES]
MapMethod = Literal[MAP_METHODS]
LabelMethod = Literal[LABEL_METHODS]
NearDuplicateSearch = Literal[NEAR_DUPLICATE_SEARCH]
ModelFormat = Literal[MODEL_EXPORT_FORMATS]
ClfName = enum.Enum("ClfName", {k: k for k in HEAD_KINDS}, type=str)  # typer takes lists of enums, not of Literals


def _choice(default: Any, *names: str, help: str) -> Any:
    return typer.Option(default, *names, case_sensitive=False, help=help)


def _json_flag(what: str = "Print one JSON object on stdout (errors too: {\"error\", \"exit_code\"}).") -> Any:
    return typer.Option(False, "--json", help=what)


def _quiet_flag() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress bars or messages on stderr and no summary on stdout; warnings and errors still go to stderr (--log-file gets everything).")


def _memory_flag() -> Any:
    return typer.Option("auto", "--memory-budget", help="Memory the cache's rows may take (e.g. 2GiB, 512MiB; a bare number is GiB); over it the command "
                        "streams the cache in chunks and says so. Default auto: a quarter of the memory available when the command starts.")


def _trust_hub_flag(what: str = "a head or model file") -> Any:
    return typer.Option(False, "--trust-hub", help=f"Let {what} that names a hub:REPO_OR_DIR:ENTRY backbone run that repo's hubconf.py (Python code); "
                                                   "without it such a file is refused (exit 5) before any of that code runs.")


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "pip install -e '.[gpu]'" keeps its brackets
    help="Run frozen image backbones once, cache embeddings in HDF5, train heads on the cache.",
    epilog=EXIT_CODES_HELP,
)
_state: dict[str, Any] = {"debug": False, "json": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Also append every message, with timestamps, to this file (for cron)."),
    log_json: bool = typer.Option(False, "--log-json", help="Write the log as JSON lines (to --log-file, else stderr)."),
) -> None:
    from pipeline import logs

    _state["debug"] = debug
    try:
        logs.configure(log_file, log_json)
    except OSError as exc:
        typer.echo(f"error: --log-file {str(log_file)!r} cannot be opened ({exc.strerror}); choose a writable path", err=True)
        raise typer.Exit(2)


def _begin(as_json: bool, quiet: bool) -> None:
    """Per command: --json owns stdout; --json/--quiet leave only warnings and errors on stderr."""
    from pipeline import logs, threads

    threads.use_free_cores()  # a busy neighbour's core is not ours: threads for the cores free now
    _state["json"] = as_json
    _state["quiet"] = quiet or as_json or _torchrun_worker()
    _state["bars"] = _Bars(not (quiet or as_json))
    logs.quiet_console(quiet or as_json)


def _bar(label: str) -> Callable[[int, int, float], None] | None:
    """A progress callback for the library (None when bars are off)."""
    bars = _state.get("bars")
    return bars(label) if bars else None


def _torchrun_worker() -> bool:
    """Under torchrun only rank 0 reports; the other ranks stay silent."""
    return int(os.environ.get("RANK", "0")) != 0


def command(fn: Callable[..., int] | None = None, *, name: str | None = None) -> Any:
    """Register ``fn`` as a command whose return value is the exit code, and map every
    error to its documented exit code with a one-line message (traceback only with --debug).
    ``@command(name="import")`` names a command whose function cannot bear its name."""
    if fn is None:
        return lambda f: command(f, name=name)
    from pipeline.errors import ExitCode, FeatcacheError
    from pipeline.interrupts import sigterm_as_interrupt

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        error: tuple[str, str, int, BaseException] | None = None  # message, type, exit code, exception
        try:
            with sigterm_as_interrupt():  # SIGTERM (cron timeouts, kill) stops like Ctrl-C: commit, then exit 130
                code = fn(*args, **kwargs)
        except FeatcacheError as exc:
            error = (str(exc), type(exc).__name__, exc.exit_code, exc)
        except KeyboardInterrupt as exc:
            error = ("interrupted (finished work was committed)", "Interrupted", ExitCode.INTERRUPTED, exc)
        except Exception as exc:  # a bug: say so briefly, unless --debug
            error = (f"internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug and report it)", "InternalError", ExitCode.INTERNAL, exc)
        finally:
            bars = _state.pop("bars", None)
            if bars:  # before any message, so it is not drawn over
                bars.stop()
        if error is not None:
            message, kind, code, exc = error
            if _state["debug"] and kind != "Interrupted":
                traceback.print_exception(exc)
            _fail(message if kind in ("Interrupted", "InternalError") else f"error: {message}")
            if _state["json"]:
                _emit_json({"error": message, "error_type": kind, "exit_code": code})
        raise typer.Exit(code or 0)

    return app.command(name, epilog=EXIT_CODES_HELP)(wrapper)


def _say(msg: str) -> None:
    """A message for people (stderr unless --quiet/--json) and for --log-file."""
    from pipeline import logs

    logs.info(msg)


def _result(msg: str) -> None:
    """A command's result: stdout (unless --quiet/--json), and --log-file; progress and logs stay on stderr."""
    from pipeline import logs

    logs.result(msg, show=not _state.get("quiet", False))


def _list(label: str, items: list[tuple[str, str]], limit: int = 20) -> None:
    """``  label: PATH: REASON`` for the first ``limit`` items, names escaped: a newline in a
    file name must not start a line of its own."""
    from pipeline.names import printable

    for path, reason in items[:limit]:
        _say(f"  {label}: {printable(path)}: {printable(reason)}")


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


class _Bars:
    """rich progress bars on stderr for the library's ``progress(done, total, elapsed)``
    callbacks: images/s and time left, one bar per pass (a new bar when ``done`` starts over,
    e.g. each epoch). Off when stderr is not a terminal (cron, pipes) and under --quiet/--json."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty() and not _torchrun_worker()
        self._live: Any = None

    def __call__(self, label: str) -> Callable[[int, int, float], None] | None:
        if not self.enabled:
            return None
        task: dict[str, Any] = {"id": None, "done": -1, "pass": 0}

        def update(done: int, total: int, elapsed: float) -> None:
            live = self._start()
            if task["id"] is None or done < task["done"]:
                task["pass"] += 1
                name = label if task["pass"] == 1 else f"{label} {task['pass']}"
                task["id"] = live.add_task(name, total=total, rate=0.0)
            task["done"] = done
            live.update(task["id"], completed=done, total=total, rate=done / elapsed if elapsed > 0 else 0.0)
            if done >= total:  # the pass is over: its summary line comes next, below the finished bar
                self.stop()

        return update

    def _start(self) -> Any:
        if self._live is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]:7.1f} img/s"), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._live.start()
        return self._live

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


@command
def extract(
    data_dir: Path = typer.Argument(..., metavar="DATA", help="Image folder (class sub-folders as ImageFolder, train/ val/ [test/] roots, or a flat unlabeled folder) or a manifest listing images (.csv, .tsv, .jsonl, .parquet: path, optional label and split columns)."),
    models: list[str] = typer.Option(..., "--model", "-m", help="torchvision model name (see `models`; any case), timm:NAME, pretrainedmodels:NAME or hub:REPO_OR_DIR:ENTRY; repeat it to extract several backbones in one pass (each file read and decoded once)."),
    weights: str = typer.Option("DEFAULT", "--weights", "-w", help="DEFAULT, a weights name (e.g. IMAGENET1K_V2), none (seeded random init), or a state_dict PATH; names in any case."),
    outs: list[Path] | None = typer.Option(None, "--out", "-o", help="Cache file (one per --model, in order); default cache/<model>__<weights>__<root>-<hash>.h5."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per backbone forward."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Decoder processes (default: none on a CPU of <= 2 cores, where decoding in-process measured faster; a quarter of the cores above; on CUDA every core but one)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    dtype: Dtype = _choice("float32", "--dtype", help="Stored embedding dtype."),
    layout: Layout = _choice("auto", "--layout", help="auto-detect, imagefolder (class folders), split (train/val/test roots) or flat (unlabeled)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none (recorded in the cache)."),
    commit_every: int = typer.Option(1000, "--commit-every", help="Commit a part after this many images (bounds work lost to a crash)."),
    commit_seconds: float = typer.Option(60.0, "--commit-seconds", help="...or after this many seconds."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Larger images are recorded as decompression bombs and skipped."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (bf16 where supported, else fp16); same as --precision bf16/fp16."),
    engine: Engine = _choice("auto", "--engine", help="auto (the engine measured fastest on this machine, once the job repays measuring; else eager), eager, compile (torch.compile), cudagraph (CUDA: the eager model captured as one CUDA graph; auto's pick on CUDA), onnxruntime or openvino (optional extras); every engine is checked against eager."),
    precision: Precision = _choice("fp32", "--precision", help="fp32 (exact), bf16/fp16 (only where the hardware runs it natively, else fp32 with a message), auto (bf16 where native)."),
    decode: Decode = _choice("exact", "--decode", help="exact; draft: JPEGs decoded at a reduced DCT scale still >= the resize target (several times faster on large photos); gpu: JPEGs decoded by nvJPEG on CUDA. Both change pixels slightly, are recorded in the cache and never mixed with exact rows."),
    gpu_decoder: GpuDecoder = _choice("auto", "--gpu-decoder", help="With --decode gpu: torchvision (its nvJPEG decoder), nvimgcodec (NVIDIA nvImageCodec, with the GPU's hardware JPEG decoder; pip install -e '.[gpu]'), or auto (torchvision's while torchvision has one: measured as fast or faster on an H200). Recorded in the cache."),
    repair: bool = typer.Option(False, "--repair", help="Before extracting, make a damaged cache consistent: rebuild a damaged manifest from its parts, drop damaged parts (their images are extracted again) and retry every failed file."),
    verify_content: bool = typer.Option(False, "--verify-content", help="Hash every file the size+mtime check calls unchanged and extract again those whose bytes differ from their row's SHA-256 (content changed with the mtime restored: touch -r, cp -p, rsync -t); also retries every failed file. Reads every file: see the README for its cost."),
    path_col: str = typer.Option("path", "--path-col", help="Manifest column holding the image path (relative to the manifest's folder, or absolute)."),
    label_col: str = typer.Option("label", "--label-col", help="Manifest column holding the class name (optional column; classes are sorted as ImageFolder sorts folders)."),
    split_col: str = typer.Option("split", "--split-col", help="Manifest column holding train/val/test (optional column)."),
    layers: list[str] | None = typer.Option(None, "--layer", "--layers", "-l", help="Tap this layer instead of the final embedding (repeat it: one forward, one cache per layer): a module name (see `models --layers MODEL`) or lastK (class tokens of the last K transformer blocks, as DINOv2)."),
    token_pool: TokenPool = _choice("cls", "--token-pool", help="How a tapped token sequence (ViT) is pooled: cls (class token) or cls+mean (class token and mean patch token). Feature maps are averaged."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same cache to finish."),
    trust_hub: bool = _trust_hub_flag("a fine-tuned model file given as --model"),
    as_json: bool = _json_flag("Print one JSON summary on stdout (with several --model or --layer: {\"caches\": [...]})."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Embed every image not yet in the cache (incremental, crash-safe)."""
    from pipeline.errors import UsageError
    from pipeline.extract import ExtractOptions, extract_many

    _begin(as_json, quiet)
    if outs and len(outs) != len(models):
        raise UsageError(f"--out was given {len(outs)} times for {len(models)} --model values; give one --out per --model, or none")
    summaries = extract_many(data_dir, models, outs or None, _options(ExtractOptions, {**locals(), "layers": tuple(layers or ())}), wait=wait,
                             progress=_bar("extract"), trust_hub=trust_hub)
    code = 3 if any(s.failed for s in summaries) else 0
    if as_json:
        _emit_json({**summaries[0].to_dict(), "exit_code": code} if len(summaries) == 1 else {"caches": [s.to_dict() for s in summaries], "exit_code": code})
        return code
    for summary in summaries:
        for dropped in summary.repaired.get("dropped_parts", []):
            rows = f"{dropped['rows']} rows, " if dropped["rows"] is not None else ""
            _say(f"{summary.cache}: repaired: dropped damaged part {dropped['part']} ({rows}{dropped['problem']}); extracted again")
        _result(
            f"{summary.cache}: {summary.new} new, {summary.cached} cached, {summary.failed} failed, {summary.removed} removed"
            + (f" ({summary.hashed} hashed, {summary.content_changed} with changed content)" if summary.hashed else "") + "; "
            f"{summary.rows} rows x {summary.embed_dim} ({summary.model}{' ' + summary.layer if summary.layer else ''}, {summary.weights}, {summary.engine} {summary.precision}{'' if summary.decode == 'exact' else ', ' + summary.decode + ' decode'}) in {summary.seconds:.1f}s"
            + (f", {summary.images_per_s:.1f} img/s" if summary.new else "")
        )
        _list("failed", summary.failures)
        if summary.failed > 20:
            _say(f"  ... and {summary.failed - 20} more (see `status` or --json)")
        _list("skipped", summary.skipped)
        if len(summary.skipped) > 20:
            _say(f"  ... and {len(summary.skipped) - 20} more skipped (see --json)")
    return code


@command
def engines(
    model: str = typer.Option(..., "--model", "-m", help="torchvision model name, timm:NAME, pretrainedmodels:NAME or hub:REPO_OR_DIR:ENTRY."),
    weights: str = typer.Option("DEFAULT", "--weights", "-w", help="As for extract (the measurement is per model and weights)."),
    precision: Precision = _choice("fp32", "--precision", help="As for extract."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="As for extract (the choice is per batch size)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Folder of the caches whose extracts should use the choice (default: cache/)."),
    trust_hub: bool = _trust_hub_flag("a fine-tuned model file given as --model"),
    as_json: bool = _json_flag(),
    quiet: bool = _quiet_flag(),
) -> int:
    """Measure every engine available here on this model and remember the fastest for `extract --engine auto`."""
    from pipeline.choices import canonical_device, canonical_weights
    from pipeline.extract import measure_engines

    _begin(as_json, quiet)
    result = measure_engines(model, canonical_weights(weights), precision=precision, batch_size=batch_size, device=canonical_device(device), seed=seed,
                             cache_dir=cache_dir, trust_hub=trust_hub)
    if as_json:
        _emit_json(result)
        return 0
    for name, rate in result["images_per_s"].items():
        typer.echo(f"{name:<12} {rate:8.1f} img/s" if rate else f"{name:<12}      n/a  ({result['skipped'].get(name, '')})")
    typer.echo(f"fastest: {result['engine']} ({result['precision']}, batch {batch_size}); `extract --engine auto` uses it from now on ({result['choice_file']})")
    return 0


@command
def status(
    target: Path = typer.Argument(..., metavar="TARGET", help="A cache (.h5), a head or fine-tuned model (.pt), a model written by export-model (.onnx), or a job file (.toml)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="For a cache: check every part against its SHA-256 (reads every byte once; exit 5 when damaged); for an .onnx file, its graph against the SHA-256 in its metadata."),
    as_json: bool = _json_flag(),
    quiet: bool = _quiet_flag(),
) -> int:
    """What a cache holds, what a head/model was fitted on and whether it is stale, or what a job would do (the report goes to stdout, also under --quiet)."""
    from pipeline.errors import UsageError

    _begin(as_json, quiet)
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
    if target.suffix.lower() == ".onnx":
        from pipeline.status import format_onnx_status, onnx_status

        info = onnx_status(target, verify=verify)
        typer.echo(json.dumps(info, default=str) if as_json else format_onnx_status(info))
        return 0
    from pipeline.status import cache_status, format_cache_status

    if target.is_dir() and not target.name.endswith(".parts"):
        raise UsageError(f"{str(target)!r} is a folder; pass a cache .h5 file, a head/model .pt file or a job .toml file")
    info = cache_status(target, verify=verify)
    damaged = not info.get("integrity", {"ok": True})["ok"]
    typer.echo(json.dumps({**info, "exit_code": 5} if damaged else info, default=str) if as_json else format_cache_status(info))
    if damaged:
        names = [d["part"] for d in info["integrity"]["damaged"]]
        _say(f"error: cache {str(target)!r}: {len(names)} damaged part(s) ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}); re-run your "
             "extract command with --repair to drop their rows and extract those images again")
        return 5
    return 0


@command
def verify(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache (.h5) written by extract."),
    as_json: bool = _json_flag(),
    quiet: bool = _quiet_flag(),
) -> int:
    """Check every byte of a cache like fsck: each part's size and SHA-256 against its manifest, headers, tombstones (exit 5 when damaged)."""
    from pipeline.errors import ExitCode
    from pipeline.store import verify_cache

    _begin(as_json, quiet)
    report = verify_cache(cache, progress=_bar("verify"))
    code = ExitCode.OK if report.ok else ExitCode.INCOMPATIBLE
    if as_json:
        _emit_json({**report.to_dict(), "exit_code": code})
        return code
    if report.manifest_damaged:
        _say(f"error: {report.manifest_damaged}")
        return code
    schema = "" if report.schema_version == 2 else f" (schema {report.schema_version}: no checksums; any write migrates it to schema 2)"
    typer.echo(f"{cache}: {report.rows} rows in {report.parts} part(s), version {report.generation}; {report.bytes_checked / 2**20:.1f} MiB checked "
               f"in {report.seconds:.1f}s{schema}")
    for d in report.damaged:
        typer.echo(f"  DAMAGED {d['part']}: {d['problem']}")
    if report.unlisted:
        typer.echo(f"  {len(report.unlisted)} unlisted part file(s) (a writer died before listing them; the next writer adopts or deletes them)")
    if report.retired:
        typer.echo(f"  {len(report.retired)} retired part file(s) kept for readers (deleted by the next writer once no reader needs them)")
    if report.damaged:
        _say(f"error: {len(report.damaged)} damaged part(s); re-run your extract command with --repair to drop their rows and extract those images again")
    else:
        typer.echo("  ok: every part is exactly what was written")
    return code


@command
def run(
    job: Path = typer.Argument(..., metavar="JOB", help="Job file (TOML): data, backbones, heads, optional finetune; see the README."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a job-file value: KEY=VALUE, e.g. finetune.epochs=3 or backbones.0.batch_size=16 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Refit every head and restart every fine-tune (extraction stays incremental)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what is stale and would run (same as `status JOB`)."),
    device: str | None = typer.Option(None, "--device", help="Override the job's device: auto, cpu or cuda[:N]."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Override the job's decoder processes."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for locks held by other writers (the job, a cache, a head, a model)."),
    trust_hub: bool = _trust_hub_flag("a head or model file (not needed for the hub: backbones the job file names itself)"),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Run a job file, doing only what is stale (for cron): extract, fit heads, fine-tune."""
    from pipeline.choices import canonical_device
    from pipeline.jobs import run_job
    from pipeline.status import format_job_plan

    _begin(as_json, quiet)
    result = run_job(job, set_ or [], force=force, dry_run=dry_run, wait=wait, device=canonical_device(device), workers=workers, progress=_bar,
                     trust_hub=trust_hub)
    code = 3 if result.failed_inputs else 0
    if as_json:
        _emit_json({**result.to_dict(), "exit_code": code})
    elif dry_run:
        typer.echo(format_job_plan(result))
    else:
        ran = [s for s in result.steps if s.action != "skip"]
        _result(f"[{result.name}] done in {result.seconds:.1f}s: {len(ran)} step(s) ran, {len(result.steps) - len(ran)} up to date"
             + (f"; {result.failed_inputs} input file(s) failed (exit 3)" if result.failed_inputs else "") + f"; report {result.report}")
    return code


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
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
            _result(format_metrics(split, metrics[split]))


@command
def fit_head(
    cache: Path = typer.Argument(..., metavar="CACHE", help="Cache .h5 written by extract."),
    clf: Clf = _choice("logreg", "--clf", help="logreg (scikit-learn-compatible, C chosen by CV), linear or mlp (torch), knn (cosine neighbours)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Head file; default heads/<cache>.<clf>.head.pt."),
    C: float | None = typer.Option(None, "--C", help="logreg: fix C (default: chosen from 1e-6 ... 1e4 along a warm-started path, coarse to fine)."),
    workers: int | None = typer.Option(None, "--threads", "--workers", "-j", "--jobs", help="logreg: solver threads (default: the cores free when the command starts; --workers/-j are its older names: elsewhere --workers counts decoder processes)."),
    epochs: int | None = typer.Option(None, "--epochs", help="torch heads: maximum epochs (default 100, early stopping on val loss)."),
    lr: str | None = typer.Option(None, "--lr", help="torch heads: AdamW learning rate (default: linear 3e-3, mlp 1e-3); several (1e-3,3e-3,1e-2) train a grid in one read and keep the best on val."),
    weight_decay: str | None = typer.Option(None, "--weight-decay", help="torch heads: AdamW weight decay (default 1e-4); several (0,1e-4,1e-3) join the grid."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="torch heads: minibatch size (default: linear 64, mlp 256)."),
    hidden: str | None = typer.Option(None, "--hidden", help="mlp: hidden sizes (default 512,256); e.g. 1024; several architectures with ':' (512,256:1024) join the grid."),
    dropout: str | None = typer.Option(None, "--dropout", help="mlp: dropout per hidden layer (default 0.25,0.5)."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="torch heads: label smoothing."),
    schedule: HeadSchedule = _choice("cosine", "--schedule", help="torch heads: learning-rate schedule."),
    patience: int | None = typer.Option(None, "--patience", help="torch heads: early-stopping patience in epochs (default 10; 0 = off)."),
    class_weight: str | None = typer.Option(None, "--class-weight", help="balanced: weight classes inversely to their frequency (default: equal)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share when the data is not pre-split (hash of path: stable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and the head."),
    stream: bool = typer.Option(False, "--stream", help="Stream the cache in chunks instead of loading it (logreg: the same objective summed over chunks; automatic over --memory-budget)."),
    memory_budget: str = _memory_flag(),
    k: str | None = typer.Option(None, "--k", help="knn: neighbours, one count or several (e.g. 10,20,100,200: scored in one pass, the best on val kept; default 20)."),
    select_on: SelectOn = _choice("cv", "--select-on", help="logreg: choose C by cross-validation on the training rows (cv) or on the validation rows (val)."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same head file."),
    report: bool = typer.Option(False, "--report", help="Also write the HTML report beside the head (<head>.report.html; see `report`)."),
    as_json: bool = _json_flag("Print one JSON object with the metrics on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Fit a head on a cache, evaluate it on val/test, save it with its provenance and reports."""
    from pipeline.heads import FitOptions
    from pipeline.heads import fit_head as run_fit

    _begin(as_json, quiet)
    hidden = tuple(tuple(int(h) for h in _floats(arch, "--hidden")) for arch in hidden.split(":")) if hidden else None
    lr, weight_decay = _floats(lr, "--lr"), _floats(weight_decay, "--weight-decay")
    dropout = _floats(dropout, "--dropout")
    k = tuple(int(n) for n in _floats(k, "--k")) if k else None
    r = run_fit(cache, _options(FitOptions, locals()), out, wait=wait)
    if report:
        r.reports["report_html"] = _write_report(r.head_path)
    if as_json:
        _emit_json({"head": r.head_path, "clf": r.kind, "cache": r.cache, "n_train": r.n_train, "n_val": r.n_val, "n_test": r.n_test,
                    "fit_seconds": r.seconds, "metrics": r.metrics, "reports": r.reports})
    else:
        _result(f"{r.kind} head fitted on {r.n_train} rows in {r.seconds:.1f}s -> {r.head_path}")
        _print_metrics(r.metrics)
        for name, path in r.reports.items():
            _result(f"  {name}: {path}")
    return 0


@command
def evaluate(
    head: Path = typer.Argument(..., metavar="HEAD", help="Head written by fit-head, or a model written by finetune."),
    cache: Path = typer.Option(..., "--cache", help="A cache of the same backbone, weights and classes."),
    memory_budget: str = _memory_flag(),
    as_json: bool = _json_flag("Print one JSON object with the metrics on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Re-score a saved head on a compatible cache."""
    from pipeline.heads import evaluate_head

    _begin(as_json, quiet)
    result = evaluate_head(head, cache, memory_budget=memory_budget)
    if as_json:
        _emit_json(result)
    else:
        _print_metrics(result)
    return 0


@command
def predict(
    model_path: Path = typer.Argument(..., metavar="HEAD_OR_MODEL", help="Head written by fit-head, or a fine-tuned model written by finetune."),
    images: list[str] | None = typer.Argument(None, metavar="[IMAGES]...", help="Image files, folders (a class sub-folder's name is taken as the true label), manifests, tar shards or datasets (hf:PATH, torchvision:NAME:ROOT). With --cache and no images: score the cache's rows."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Predictions file, format from the suffix: .csv, .jsonl or .parquet (path, predicted, probability, top-k, true; written whole or not at all)."),
    grid: Path | None = typer.Option(None, "--grid", help="PNG grid of the first images with predicted (and true) labels."),
    topk: int = typer.Option(5, "--topk", help="How many classes in the top-k list."),
    with_embeddings: bool = typer.Option(False, "--with-embeddings", help="Also write each image's embedding (Parquet --out only)."),
    cache: Path | None = typer.Option(None, "--cache", help="Score rows of this cache without the backbone; with IMAGES (one folder, manifest or shard set), extract the files it lacks into it first, then score them all."),
    split: str | None = typer.Option(None, "--split", help="With --cache and no images: train, val, test, unlabeled or all (default all)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per backbone forward."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Decoder processes (default: sized to the machine, as extract)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    engine: Engine = _choice("auto", "--engine", help="As for extract (auto: the engine measured fastest here, once a job repays it)."),
    precision: Precision | None = _choice(None, "--precision", help="Default: the precision the head's cache was extracted in (the numbers the head was trained on); as for extract."),
    decode: Decode | None = _choice(None, "--decode", help="Default: the decoding the head's cache recorded; as for extract."),
    gpu_decoder: GpuDecoder = _choice("auto", "--gpu-decoder", help="As for extract."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Larger images are decompression bombs: listed as failed."),
    memory_budget: str = _memory_flag(),
    trust_hub: bool = _trust_hub_flag(),
    as_json: bool = _json_flag("Print one JSON object on stdout (top-k as a list of {class, probability}; with --out at most the first 10,000 predictions, the file has them all)."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Classify new images (or a cache's rows) with a saved head or fine-tuned model, at extraction speed; exit 3 when some images failed."""
    from pipeline.names import printable
    from pipeline.predict import PredictOptions
    from pipeline.predict import predict as run_predict

    _begin(as_json, quiet)
    opts = _options(PredictOptions, locals(), out=None if out is None else str(out), grid=None if grid is None else str(grid),
                    cache=None if cache is None else str(cache))
    r = run_predict(model_path, images or [], opts, trust_hub=trust_hub, progress=_bar("predict"))
    code = 3 if r.failures else 0
    if as_json:
        _emit_json({**r.to_dict(), "exit_code": code})
        return code
    for row in r.rows[:20]:
        typer.echo(f"{printable(row['path'])}: {printable(row['predicted'])} ({row['probability']:.3f})"
                   + (f"  true={printable(row['true'])}" if row["true"] else ""))
    if r.n > 20:
        _say(f"... {r.n - 20} more" + (f" in {r.out}" if r.out else " (use --out FILE.csv|.jsonl|.parquet)"))
    if r.known:
        _say(f"accuracy on {r.known} labelled images: {r.accuracy:.4f}")
    _say(f"{r.n} predicted in {r.seconds:.1f}s" + (f" ({r.n / r.seconds:.1f}/s" + (f", {r.engine}" if r.engine else "") + ")" if r.seconds > 0 else "")
         + (f"; {r.extracted} new image(s) extracted into the cache first" if r.source == "images+cache" else ""))
    _list("failed", r.failures, len(r.failures))
    for name, value in (("out", r.out), ("grid", r.grid)):
        if value:
            _say(f"  {name}: {value}")
    return code


@command(name="export-model")
def export_model(
    model_path: Path = typer.Argument(..., metavar="HEAD_OR_MODEL", help="Head written by fit-head (logreg, linear, mlp, knn), or a fine-tuned model written by finetune."),
    format: ModelFormat = _choice("onnx", "--format", help="File format: onnx (one graph from images to class probabilities, opset 18, dynamic batch)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write it (default: beside the head, suffix .onnx); written atomically."),
    uint8: bool = typer.Option(False, "--uint8", help="The graph takes uint8 RGB pixels [B, 3, H, W] after resize and crop and normalises them itself "
                                                     "(mean/std, input range, BGR models); default: float NCHW already normalised."),
    probe: list[Path] | None = typer.Option(None, "--probe", help="Images (files, folders, a manifest) the export is checked on against predict "
                                                                   "before it is written (default: a few from the head's data root)."),
    probe_images: int = typer.Option(8, "--probe-images", help="How many probe images."),
    trust_hub: bool = _trust_hub_flag(),
    as_json: bool = _json_flag(),
    quiet: bool = _quiet_flag(),
) -> int:
    """Write a head or fine-tuned model as one ONNX file (backbone + head, class names, preprocessing and provenance in its metadata), checked in ONNX Runtime against predict first (exit 1, nothing written, when it differs)."""
    from pipeline.serving import ExportOptions
    from pipeline.serving import export_model as run_export

    _begin(as_json, quiet)
    options = ExportOptions(format=format, uint8=uint8, probe=tuple(str(p) for p in probe or ()), probe_images=probe_images)
    r = run_export(model_path, out, options, trust_hub=trust_hub)
    if as_json:
        _emit_json({k: v for k, v in r.to_dict().items() if k != "metadata"})
    else:
        _result(f"{r.path}: {r.head_kind} head, {len(r.classes)} classes, {r.input_kind} input, {r.bytes / 2**20:.1f} MiB; "
             f"max |dp| {r.max_abs_diff:.2g} against predict on {len(r.probe_images)} probe image(s)")
    return 0


@command
def serve(
    model_path: Path = typer.Argument(..., metavar="HEAD_OR_MODEL_OR_ONNX", help="Head, fine-tuned model (.pt) or a model written by export-model (.onnx)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; the service has no authentication: see the README)."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free one; the log line says which)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Images per model call, gathered across concurrent requests."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long the first image of a batch waits for others."),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help="Refuse larger images from their header, before decoding (default: PIL's limit, as extract)."),
    max_body: int = typer.Option(32 << 20, "--max-body", help="Largest request body in bytes (413 above)."),
    topk: int = typer.Option(5, "--topk", help="Classes per image when a request does not say (?topk=N)."),
    engine: Engine = _choice("auto", "--engine", help="For a .pt file: the engine measured fastest here (`engines`), else eager; or name one. An .onnx file runs on ONNX Runtime."),
    precision: Precision | None = _choice(None, "--precision", help="For a .pt file. Default: the precision the head's cache was extracted in; auto: bf16 where the hardware runs it natively (AMX, AVX-512 BF16, CUDA >= 8.0): several times the throughput, probabilities within ~1e-2 of fp32."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] (a .pt file)."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Decoder threads (default: one per core)."),
    trust_hub: bool = _trust_hub_flag(),
    as_json: bool = _json_flag("On exit, print one JSON object on stdout: requests answered and refused, images, batches."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Serve a head, fine-tuned model or ONNX file over HTTP: POST /predict (image bytes or multipart files; ?topk=5), GET /health, GET /metadata. SIGTERM/Ctrl-C answer what is in flight, then exit 0."""
    from pipeline import logs
    from pipeline.serving.server import ServeOptions
    from pipeline.serving.server import serve as run_serve

    _begin(as_json, quiet)
    logs.quiet_console(quiet)  # --json is only the summary on stdout at exit: the address and the access log stay on stderr
    flags = locals()
    options = _options(ServeOptions, {k: v for k, v in flags.items() if not (k == "max_pixels" and v is None)})
    summary = run_serve(model_path, options, trust_hub=trust_hub, quiet=quiet)
    if as_json:
        _emit_json(summary.to_dict())
    return 0


@command
def compare(
    caches: list[Path] = typer.Argument(..., metavar="CACHES...", help="Caches of different backbones/weights over the same data (or one cache, to compare heads)."),
    clf: list[ClfName] = _choice([ClfName.logreg], "--clf", help="Head to fit on each cache; repeat it to compare heads."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share (same hash split for every cache)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and the heads."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the fitted heads and the chart (default: heads/compare/, or $FEATCACHE_HEAD_DIR/compare/)."),
    memory_budget: str = _memory_flag(),
    as_json: bool = _json_flag(),
    quiet: bool = _quiet_flag(),
) -> int:
    """Which backbone transfers best, and which head: every --clf on every cache, ranked."""
    from pipeline.heads import FitOptions, compare_caches
    from pipeline.heads.metrics import format_leaderboard

    _begin(as_json, quiet)
    flags = locals()
    result = compare_caches(caches, [_options(FitOptions, {**flags, "clf": name.value}) for name in clf], out_dir=out)
    if as_json:
        _emit_json(result)
    else:
        for line in format_leaderboard(result["leaderboard"]):
            _result(line)
        _result(f"  chart: {result['chart_png']}")
    return 0


@command
def finetune(
    head: Path = typer.Argument(..., metavar="HEAD", help="Head written by fit-head (or a model written by finetune): names the backbone, classes, split and data."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Fine-tuned model file; default <head>.finetuned.pt beside the head. Its checkpoint is <out>.ckpt."),
    data: Path | None = typer.Option(None, "--data", help="Image folder (default: the one the head's cache was extracted from)."),
    head_mode: HeadMode | None = _choice(None, "--head", help="from (default): start from the fitted head; new: a fresh linear layer."),
    unfreeze: str | None = typer.Option(None, "--unfreeze", help="all (default) or last:N backbone blocks (last:0 trains only the head)."),
    augment: Augment | None = _choice(None, "--augment", help="none; light (crops of 50-100 percent, no flip: digits, text); basic (default: RandomResizedCrop + flip); rotate (basic + 15 deg); strong (basic + TrivialAugment)."),
    optimizer: Optimizer | None = _choice(None, "--optimizer", help="sgd (default; momentum 0.9, nesterov) or adamw."),
    lr_backbone: float | None = typer.Option(None, "--lr-backbone", help="Backbone learning rate (default: sgd 1e-3, adamw 1e-5)."),
    lr_head: float | None = typer.Option(None, "--lr-head", help="Head learning rate (default: sgd 1e-2, adamw 1e-3)."),
    momentum: float | None = typer.Option(None, "--momentum", help="sgd momentum (default 0.9)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay on weights, not biases/norms (default: sgd 1e-4, adamw 0.05)."),
    schedule: Schedule | None = _choice(None, "--schedule", help="After warmup: cosine (default), step (x0.1 at 1/3 and 2/3) or constant."),
    warmup: float | None = typer.Option(None, "--warmup", help="Fraction of training in linear warmup (default 0.1)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 10). 0 evaluates the assembled model; on --resume, more epochs continue training."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Images per step (default 32)."),
    accum: int | None = typer.Option(None, "--accum", help="Gradient accumulation: optimiser step every N batches (default 1)."),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help="Clip the gradient norm (default 1.0; 0 = off)."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Label smoothing (default 0)."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling; default off)."),
    precision: Precision | None = _choice(None, "--precision", help="fp32 (default), bf16 (where the hardware runs it natively: AMX or AVX-512 BF16 CPUs, CUDA >= 8.0; else fp32, said once), fp16 (CUDA, loss scaling), auto (bf16 where native, fp16 on older GPUs, else fp32)."),
    channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format (default on)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for order, augmentation and new layers (default 0)."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Decoder processes (default as for extract: none on a CPU of <= 2 cores, where training measured faster without; more on bigger machines and CUDA)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>.ckpt (bit-for-bit); options left out are taken from it."),
    force: bool = typer.Option(False, "--force", help="Start over even though <out>.ckpt exists."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same model file."),
    report: bool = typer.Option(False, "--report", help="Also write the HTML report beside the model (<model>.report.html; see `report`)."),
    trust_hub: bool = _trust_hub_flag("the head"),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Fine-tune the head's backbone end to end (BatchNorm frozen), starting from the head."""
    from pipeline.finetune import FinetuneOptions, run_finetune

    _begin(as_json, quiet)
    options = _options(FinetuneOptions, locals(), head=head_mode)
    r = run_finetune(head, out, data_dir=data, options=options, resume=resume, force=force, wait=wait, progress=_bar("train"),
                     trust_hub=trust_hub)
    if report:
        r.reports["report_html"] = _write_report(r.model_path)
    code = 3 if r.failures else 0
    if as_json:
        _emit_json({**r.to_dict(), "exit_code": code})
    else:
        _result(f"{r.model_path}: best epoch {r.best_epoch} of {r.epochs_done} in {r.seconds:.1f}s (checkpoint {r.checkpoint})")
        _print_metrics(r.metrics)
        for name, path in r.reports.items():
            _result(f"  {name}: {path}")
        _list("failed", r.failures)
    return code


def _write_report(artifact: str) -> str:
    """``fit-head --report`` / ``finetune --report``: the report with its default options, beside the artifact."""
    from pipeline.report import write_report

    return write_report(artifact).path


def _audit_flags() -> dict[str, tuple[str, Any]]:
    """The flags ``audit`` and ``report`` share (AuditOptions' fields): name -> (annotation, option)."""
    from pipeline.choices import DUPLICATE_THRESHOLD

    return {
        "folds": ("int", typer.Option(5, "--folds", help="Label errors: folds of the out-of-fold logistic regression.")),
        "label_method": ("LabelMethod", _choice("prune_by_class", "--label-method", help="Label errors: cleanlab's find_label_issues filter_by method (prune_by_class found more of the flipped demo labels).")),
        "dims": ("int", typer.Option(128, "--dims", help="Principal components (whitened) the checks work in; 0 = all.")),
        "duplicate_threshold": ("float", typer.Option(DUPLICATE_THRESHOLD, "--duplicate-threshold", help="Near-duplicates: cosine similarity (whitened space) at or above which two rows are copies.")),
        "max_pairs": ("int", typer.Option(10_000, "--max-pairs", help="Near-duplicates: keep at most this many pairs (the most similar).")),
        "near_duplicates": ("NearDuplicateSearch", _choice("auto", "--near-duplicates", help="Near-duplicates: exact (every pair), ann (FAISS index, "
                            "its recall measured and printed; pip install 'featcache[ann]') or auto (exact up to 200,000 rows, then ann, else exact on a sample).")),
        "imbalance_ratio": ("float", typer.Option(10.0, "--imbalance-ratio", help="Imbalance: flag classes under largest/RATIO rows.")),
        "seed": ("int", typer.Option(0, "--seed", help="Seed for the folds and the map's sample.")),
        "device": ("str", typer.Option("auto", "--device", help="Where similarities are computed: auto (the GPU when present), cpu or cuda[:N].")),
        "memory_budget": ("str", _memory_flag()),
    }


def _with_audit_flags(fn: Callable[..., int]) -> Callable[..., int]:
    """Give a command the flags of ``_audit_flags`` (before ``--json``); it receives them as one
    dict, ``audit_flags``. One list of flags for both commands, read by typer from the signature."""
    import inspect

    flags = _audit_flags()
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "audit_flags"]
    at = next(i for i, p in enumerate(params) if p.name == "as_json")
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=ann) for name, (ann, option) in flags.items()]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        return fn(*args, audit_flags={name: kwargs.pop(name) for name in flags}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params[:at] + added + params[at:])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "audit_flags"}, **{n: a for n, (a, _) in flags.items()}}
    return wrapper


@command
@_with_audit_flags
def report(
    model_path: Path = typer.Argument(..., metavar="HEAD_OR_MODEL", help="Head written by fit-head, or a model written by finetune."),
    cache: Path | None = typer.Option(None, "--cache", help="Score on this cache (same backbone, weights and classes; default: the head's own cache)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write (default: <head>.report.html beside the head)."),
    map_: MapMethod = _choice("pca", "--map", help="2-D map: pca, umap (needs the umap extra) or tsne (on a sample of --map-points rows)."),
    map_points: int = typer.Option(5000, "--map-points", help="umap/tsne: rows drawn at random for the map."),
    max_images: int = typer.Option(48, "--max-images", help="Images shown per section (mistakes, label errors; half as many duplicate pairs)."),
    neighbours: int = typer.Option(5, "--neighbours", help="Nearest training images shown beside each mistake."),
    thumb_size: int = typer.Option(96, "--thumb-size", help="Thumbnail size in pixels."),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
    audit_flags: dict[str, Any] | None = None,
) -> int:
    """One self-contained HTML file: provenance, metrics, confusion, curves, mistakes with their nearest training images, label errors, duplicates and leaks, a 2-D map, what to do."""
    from pipeline.quality import ReportOptions
    from pipeline.report import write_report

    _begin(as_json, quiet)
    r = write_report(model_path, cache, out, _options(ReportOptions, {**locals(), **(audit_flags or {})}, map=map_))
    if as_json:
        _emit_json(r.to_dict())
        return 0
    _result(f"{r.path}: {r.mistakes} mistakes, {r.counts.get('label-errors', 0)} likely label errors, {r.counts.get('duplicates', 0)} near-duplicate pairs "
         f"({r.counts.get('leaks', 0)} leaks); {r.thumbnails} thumbnails{f', {r.missing_images} images missing' if r.missing_images else ''} in {r.seconds:.1f}s")
    from pipeline.names import printable

    for line in r.advice:
        _result(f"  - {printable(line)}")  # advice quotes class names
    return 0


@command
@_with_audit_flags
def audit(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache (.h5) written by extract or import."),
    fail_on: str | None = typer.Option(None, "--fail-on", help="Exit 8 when any of these checks finds something: label-errors, duplicates, leaks, imbalance, failed-files (comma-separated) or all."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share when the data is not pre-split (fit-head's hash rule: leaks are judged by it)."),
    limit: int = typer.Option(20, "--limit", help="Entries listed per check (--json: 1,000)."),
    as_json: bool = _json_flag("Print one JSON object on stdout: counts, then the entries of each check."),
    quiet: bool = _quiet_flag(),
    audit_flags: dict[str, Any] | None = None,
) -> int:
    """The data-quality checks alone, for cron: likely label errors, near-duplicates and split leaks, class imbalance, failed files (the report goes to stdout; exit 8 only with --fail-on)."""
    from pipeline.errors import ExitCode
    from pipeline.quality import AuditOptions, audit_cache, parse_fail_on

    _begin(as_json, quiet)
    checks = parse_fail_on(fail_on)
    a = audit_cache(cache, _options(AuditOptions, {**locals(), **(audit_flags or {})}))
    failing = a.failing(checks)
    code = ExitCode.FINDINGS if failing else ExitCode.OK
    if as_json:
        _emit_json({**a.to_dict(), "fail_on": list(checks), "failing": failing, "exit_code": code})
    else:
        from pipeline.quality import advice, format_audit

        typer.echo(format_audit(a, advice(a), limit))
    if failing:
        _fail(f"audit --fail-on {','.join(checks)}: found {', '.join(failing)} (exit 8)")
    return code


@command
def models(
    source: str | None = typer.Option(None, "--source", help="torchvision, timm or pretrainedmodels (default: every installed source)."),
    filter_: str = typer.Option("", "--filter", help="Only names containing this text (e.g. convnext)."),
    details: bool | None = typer.Option(None, "--details/--no-details", help="Embedding width and input size (default: when at most 100 models match)."),
    layers: str | None = typer.Option(None, "--layers", metavar="MODEL", help="List the layers of MODEL that extract --layer can tap, with output shape and pooled width."),
    depth: int = typer.Option(2, "--depth", help="With --layers: how many dots deep to list module names."),
    as_json: bool = _json_flag("Print JSON."),
    quiet: bool = _quiet_flag(),
) -> int:
    """List the backbones --model accepts (torchvision names, timm:NAME, pretrainedmodels:NAME), or a model's tappable layers (to stdout)."""
    from pipeline.backbones.catalog import list_backbones, list_layers

    _begin(as_json, quiet)
    if layers:
        info = list_layers(layers, depth)
        if as_json:
            _emit_json(info)
            return 0
        for row in info["layers"]:
            typer.echo(f"{row['name']:<40} {'x'.join(map(str, row['shape'])):<16} width {row['width']}")
        if info["last_k"]:
            typer.echo(f"{'last1 ... last' + str(info['last_k']):<40} class tokens of the last K of {info['last_k']} blocks (DINOv2's linear evaluation)")
        return 0
    rows, notes = list_backbones(source.lower() if source else None, filter_, details)
    if as_json:
        _emit_json({"models": rows, "notes": notes})
        return 0
    for row in rows:
        extra = f"  {row['embed_dim'] or '?':>5}-d  {row['input_size'] or '?'} px" if "embed_dim" in row else ""
        typer.echo(f"{row['name']:<48}{extra}".rstrip())
    for note in notes:
        _say(note)
    return 0


@command
def demo(
    workdir: Path = typer.Option(Path("demo_out"), "--workdir", help="Where the demo data, cache, head, model and pictures go."),
    model: str = typer.Option("resnet18", "--model", "-m", help="Backbone for the demo."),
    weights: str = typer.Option("none", "--weights", "-w", help="none works offline; DEFAULT needs the internet once."),
    finetune_epochs: int = typer.Option(1, "--finetune-epochs", help="Epochs of end-to-end fine-tuning (0 skips the stage)."),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """End to end on the embedded demo data: extract -> status -> fit-head -> finetune -> predict on held-out images."""
    from pipeline.demo import run_demo

    _begin(as_json, quiet)
    result = run_demo(workdir, model, weights, finetune_epochs, progress=_bar, show=not (as_json or quiet))
    if as_json:
        _emit_json(result)
    return 0


ExportFormat = Literal["parquet", "npy"]  # pipeline.exchange.EXPORT_FORMATS, spelled out so --help does not import the store


@command
def export(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache (.h5) written by extract or import."),
    format_: ExportFormat = _choice("parquet", "--format", "-f", help="parquet: DIR/embeddings.parquet (path, label, class, split, embedding); npy: DIR/embeddings.npy + metadata.parquet + provenance.json (clip-retrieval's layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (created; a previous export there is replaced only once the new files are complete)."),
    split: str | None = typer.Option(None, "--split", help="Only rows of these splits, comma-separated: train, val, test, none (rows without a split)."),
    classes: str | None = typer.Option(None, "--classes", help="Only rows of these classes, comma-separated (labels keep indexing the cache's classes)."),
    row_group_rows: int | None = typer.Option(None, "--row-group-rows", help="Rows per Parquet row group and per read (default: 4 MiB of embeddings, at most 65,536 rows); memory grows with it."),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Write a cache's rows to Parquet (or .npy + Parquet metadata) with its provenance, streamed in bounded memory; pyarrow, pandas and numpy read it as it is."""
    from pipeline.exchange import export_cache

    _begin(as_json, quiet)
    r = export_cache(cache, out, format_, split=split, classes=classes, row_group_rows=row_group_rows, progress=_bar("export"))
    if as_json:
        _emit_json(r.to_dict())
    else:
        _result(f"{r.out_dir}: {r.rows:,} rows x {r.embed_dim} {r.dtype} as {r.format} in {r.seconds:.1f}s ({r.mb_per_s:.0f} MB/s of embeddings, "
                f"{r.row_groups} row group(s))")
        for f in r.files:
            _result(f"  {f}")
    return 0


@command(name="import")
def import_(
    source: Path = typer.Argument(..., metavar="SOURCE", help="A folder written by export (embeddings.parquet, or embeddings.npy + metadata.parquet), or a .parquet file with path and embedding columns."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache (.h5) to write: created, or extended when it holds the same backbone (rows keyed by path: importing again replaces rows, never duplicates them)."),
    model: str | None = typer.Option(None, "--model", "-m", help="What computed the embeddings; required when the file carries no featcache provenance, else replaces the file's."),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Its weights (default: the file's provenance, else 'custom')."),
    classes: str | None = typer.Option(None, "--classes", help="Class names in label order, comma-separated (default: the file's provenance, else its class column's values, sorted)."),
    data_root: str | None = typer.Option(None, "--data-root", help="Folder the paths are relative to (default: the file's provenance)."),
    preprocessing: str | None = typer.Option(None, "--preprocessing", help='Preprocessing as JSON, e.g. \'{"resize_size": [224], "crop_size": [224]}\' (default: the file\'s provenance).'),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same cache."),
    as_json: bool = _json_flag("Print one JSON summary on stdout."),
    quiet: bool = _quiet_flag(),
) -> int:
    """Write embeddings computed elsewhere (an export's layouts) into a cache, with their provenance recorded: heads, kNN, compare and reports work on it."""
    from pipeline.exchange import import_cache

    _begin(as_json, quiet)
    r = import_cache(source, out, model=model, weights=weights, classes=classes, data_root=data_root, preprocessing=preprocessing, wait=wait,
                     progress=_bar("import"))
    if as_json:
        _emit_json(r.to_dict())
    else:
        _result(f"{r.cache}: imported {r.rows:,} rows x {r.embed_dim} {r.dtype} from {r.source} ({r.format}; provenance from the {r.provenance_from}) "
             f"in {r.seconds:.1f}s; the cache holds {r.cache_rows:,} rows, {len(r.classes)} classes"
             + (f"; {len(r.skipped):,} of {r.source_rows:,} rows skipped" if r.skipped else ""))
        _list("skipped", r.skipped)
        if len(r.skipped) > 20:
            _say(f"  ... and {len(r.skipped) - 20} more skipped (see --json)")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``featcache``), identical to ``python cli.py``.

    Usage errors the parser finds (a bad choice, a missing argument, an unknown flag) get
    the same one-line ``error: ...`` (exit 2) as the errors the library finds, not a box."""
    from pipeline.interrupts import stop_watchdog

    argv = sys.argv[1:] if argv is None else argv
    try:
        with stop_watchdog(dump_stacks="--debug" in argv):  # a stop never waits forever on a call stuck in C
            code = app(args=argv, prog_name=Path(sys.argv[0]).name or "featcache", standalone_mode=False)
    except Exception as exc:  # commands catch their own: only the parser's errors get here
        if not _is_parser_error(exc):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # no command given: the help is the answer, not an error
            typer.echo(exc.format_message())
            raise SystemExit(exc.exit_code) from None
        message = _parser_message(exc.format_message())
        if not message:  # the help was printed already: there is nothing else to say
            raise SystemExit(exc.exit_code) from None
        command_name = next((a for a in argv if not a.startswith("-")), "")
        _fail(f"error: {message} (see `{_program()} {command_name + ' ' if command_name in _command_names() else ''}--help`)")
        if "--json" in argv:
            _emit_json({"error": message, "error_type": "UsageError", "exit_code": exc.exit_code})
        code = exc.exit_code
    raise SystemExit(code or 0)


def _is_parser_error(exc: BaseException) -> bool:
    """A click/typer usage error, told by its public interface (``format_message`` and an int
    ``exit_code``): typer vendors click from 0.2x on, so its class is not ``click.ClickException``."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _parser_message(text: str) -> str:
    """The parser's complaint in featcache's words: ``--clf 'svm': choose one of logreg, linear, ...``."""
    import re

    text = text.replace("Value error, ", "").replace("\n", " ").strip()
    choice = re.match(r"Invalid value for '(--[\w-]+)'.*?: '(.*)' is not one of (.*?)\.?$", text)
    if choice:
        flag_name, value, choices = choice.groups()
        return f"{flag_name} {value!r}: choose one of {choices.replace(chr(39), '')} (any case)"
    return text


def _program() -> str:
    from pipeline.errors import command_hint

    return command_hint("").strip()


def _command_names() -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}


if __name__ == "__main__":
    main()
