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
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    _state["debug"] = debug


def command(fn: Callable[..., int]) -> Callable[..., None]:
    """Register ``fn`` as a command whose return value is the exit code, and map every
    error to its documented exit code with a one-line message (traceback only with --debug)."""
    from pipeline.errors import ExitCode, FeatcacheError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except FeatcacheError as exc:
            if _state["debug"]:
                traceback.print_exc()
            _err(f"error: {exc}")
            if _state["json"]:
                _emit_json({"error": str(exc), "error_type": type(exc).__name__, "exit_code": exc.exit_code})
            code = exc.exit_code
        except KeyboardInterrupt:
            _err("interrupted")
            code = ExitCode.INTERRUPTED
        except Exception as exc:  # a bug: say so briefly, unless --debug
            if _state["debug"]:
                traceback.print_exc()
            _err(f"internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug and report it)")
            code = ExitCode.INTERNAL
        raise typer.Exit(code or 0)

    return app.command(epilog=EXIT_CODES_HELP)(wrapper)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _emit_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, indent=None, default=str))


class _Progress:
    """One updating line on a terminal (stderr); silent when not a TTY or --quiet."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty()
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
    model: str = typer.Option(..., "--model", "-m", help="torchvision model name (see `models`) or hub:REPO_OR_DIR:ENTRY."),
    weights: str = typer.Option("DEFAULT", "--weights", "-w", help="DEFAULT, a weights name (e.g. IMAGENET1K_V2), none (seeded random init), or a state_dict PATH."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache file; default cache/<model>__<weights>__<root>-<hash>.h5."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per backbone forward."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Decoder processes (default: half the cores, at least 1; 0 decodes in-process)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored embedding dtype: float32 or float16."),
    layout: str = typer.Option("auto", "--layout", help="auto, imagefolder, split (train/val/test) or flat (unlabeled)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none (recorded in the cache)."),
    commit_every: int = typer.Option(1000, "--commit-every", help="Commit a part after this many images (bounds work lost to a crash)."),
    commit_seconds: float = typer.Option(60.0, "--commit-seconds", help="...or after this many seconds."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Larger images are recorded as decompression bombs and skipped."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (bf16 where supported, else fp16)."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another writer of the same cache to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary text (errors still go to stderr)."),
) -> int:
    """Embed every image not yet in the cache (incremental, crash-safe)."""
    from pipeline.extract import run_extract

    _state["json"] = as_json
    log = (lambda m: None) if quiet or as_json else _err
    summary = run_extract(
        data_dir, model, weights, out, batch_size=batch_size, workers=workers, device=device, dtype=dtype,
        layout=layout, seed=seed, commit_every=commit_every, commit_seconds=commit_seconds, max_pixels=max_pixels,
        amp=amp, wait=wait, progress=_Progress(not quiet and not as_json, "extract"), log=log,
    )
    code = 3 if summary.failed else 0
    if as_json:
        _emit_json({**summary.to_dict(), "exit_code": code})
    elif not quiet:
        _err(
            f"{summary.cache}: {summary.new} new, {summary.cached} cached, {summary.failed} failed, {summary.removed} removed; "
            f"{summary.rows} rows x {summary.embed_dim} ({summary.model}, {summary.weights}) in {summary.seconds:.1f}s"
            + (f", {summary.images_per_s:.1f} img/s" if summary.new else "")
        )
        for path, reason in summary.failures[:20]:
            _err(f"  failed: {path}: {reason}")
        if summary.failed > 20:
            _err(f"  ... and {summary.failed - 20} more (see `status` or --json)")
    return code


@command
def status(
    cache: Path = typer.Argument(..., help="A cache .h5 file written by extract."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> int:
    """Show what a cache holds: rows, classes, splits, failures, provenance, pending files."""
    from pipeline.report import cache_status, format_cache_status

    _state["json"] = as_json
    info = cache_status(cache)
    typer.echo(json.dumps(info, default=str) if as_json else format_cache_status(info))
    return 0


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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> int:
    """End to end on the embedded demo data (scikit-learn's digits as an image folder)."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.report import cache_status, format_cache_status

    _state["json"] = as_json
    data = write_digits(workdir / "digits")
    cache = workdir / "cache" / f"digits_{model}_{weights}.h5"
    _err(f"[1/2] extract {data} with {model} (weights {weights}) -> {cache}")
    summary = run_extract(data, model, weights, cache, progress=_Progress(not as_json, "extract"), log=_err)
    _err(f"      {summary.new} new, {summary.cached} cached, {summary.failed} failed in {summary.seconds:.1f}s")
    _err("[2/2] what the cache holds")
    info = cache_status(cache)
    if as_json:
        _emit_json({"extract": summary.to_dict(), "status": info})
    else:
        typer.echo(format_cache_status(info))
    return 0


def main() -> None:
    """Console-script entry point (``featcache``), identical to ``python cli.py``."""
    app()


if __name__ == "__main__":
    main()
