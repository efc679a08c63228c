"""How the frozen backbone runs: eager PyTorch, ``torch.compile`` (inductor, weights frozen),
ONNX Runtime or OpenVINO — chosen at run time by measuring them here, checked against eager,
and remembered on disk.

Every engine must reproduce eager fp32 within the 1e-4 relative tolerance the cache is
tested against (bf16 within 2e-2); an engine that fails the check, cannot be built here (no
C++ compiler, an operator the exporter does not know) or is not installed is skipped with a
message, never used silently.

``auto`` measures the engines available here once per model, precision, batch size and
machine, keeps the fastest, and writes that choice with its figures under
``<cache dir>/.engines``: the next cron run reads it and pays no measuring. One-time costs
(exporting to ONNX, compiling) are paid only when the job is big enough to win them back,
and their results are cached in the same folder, keyed by the model's weights and
architecture, the input size and the library versions.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..choices import ENGINES
from ..errors import UsageError, command_hint
from ..store import atomic_path
from .hardware import PrecisionChoice, cpu_summary

logger = logging.getLogger(__name__)

INSTALL_HINT = {"onnxruntime": "pip install 'featcache[onnx]'", "openvino": "pip install 'featcache[openvino]'"}
# Images from which `auto` measures the engines when nothing was measured yet on this machine:
# exporting and compiling resnet50 once costs about a minute on 2 cores, which the fastest
# engine wins back against eager (~28 vs ~50 img/s) after roughly 2,000 images.
AUTO_TUNE_MIN_IMAGES = 2000
# Images from which a remembered choice is rebuilt when its export/compile cache is cold.
AUTO_REBUILD_MIN_IMAGES = 500
# What a warm start costs in a new process, as a share of the engine's first (cold) build:
# measured on timm:convnext_tiny bf16, 2 cores: torch.compile 18.7 s cold, 6.4 s warm (dynamo
# traces again in every process even with the inductor cache); OpenVINO 1.5 s, 0.3 s. With
# the rates at 63 vs 62 img/s, compile then made a 512-image extract 1.6x slower.
CUDA_GRAPH_MIN_BATCHES = 4  # auto on CUDA captures a graph for jobs of this many full batches or more
WARM_START_SHARE = {"eager": 0.0, "compile": 0.35, "cudagraph": 1.0, "onnxruntime": 0.25, "openvino": 0.25}
EXACT_RTOL = 1e-4
REDUCED_RTOL = 2e-2


class EngineUnavailable(Exception):
    """This engine cannot run this model here (with the reason)."""


class Engine:
    """Runs the headless backbone on a batch: float32 numpy [B, D] out."""

    name: str
    precision: PrecisionChoice
    device: torch.device  # where its input batches go (pixels are normalised there)
    note: str  # how it was built and checked, for the log

    def embed(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def embed_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start embedding ``images``; the returned function waits for and returns the rows.
        Engines that run on the CPU are done when this returns."""
        rows = self.embed(images)
        return lambda: rows


@dataclass
class TorchEngine(Engine):
    """Eager PyTorch, or the same module compiled (``name="compile"``)."""

    name: str  # "eager" or "compile"
    model: nn.Module
    precision: PrecisionChoice
    device: torch.device
    channels_last: bool
    batch_size: int
    note: str = ""

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return self.embed_async(images)()

    def embed_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        """A compiled engine sees one fixed batch shape (the last, smaller batch is padded),
        so it never recompiles mid-run. On CUDA the forward and the copy of its rows into
        page-locked memory are queued, and the caller goes on (to the writer's work for the
        batch before) while the GPU runs."""
        n = len(images)
        if self.name == "compile" and n < self.batch_size:
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.precision.dtype) if self.precision.dtype is not None else nullcontext()
        exact = no_tf32() if self.device.type == "cuda" and self.precision.dtype is None else nullcontext()
        with torch.inference_mode(), autocast, exact:
            out = _rows(self.model(x))[:n].float()
        if self.device.type != "cuda":
            rows = out.numpy()
            return lambda: rows
        return _copy_back(out)


@dataclass
class CudaGraphEngine(Engine):
    """The eager model captured once as a CUDA graph for the full batch shape: each batch is
    one copy into the graph's input and one replay instead of hundreds of kernel launches
    from Python. The thread that feeds the GPU then holds the interpreter lock for
    microseconds per batch, leaving it to the threads that decode and write (measured on an
    H200: bench/extract.py --device cuda). A smaller last batch fills the first rows."""

    name: str
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    precision: PrecisionChoice
    device: torch.device
    note: str = ""

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return self.embed_async(images)()

    def embed_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        n = len(images)
        self.static_in[:n].copy_(images.to(self.device, non_blocking=True))
        self.graph.replay()
        return _copy_back(self.static_out[:n])  # queued before the next replay overwrites it


def _copy_back(out: torch.Tensor) -> Callable[[], np.ndarray]:
    """Queue the copy of rows on the GPU into page-locked memory; the returned function waits
    for that copy alone (an event), not for everything queued after it."""
    host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(out, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def rows() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return rows


def _rows(out) -> torch.Tensor:
    """A backbone's output as [B, D]: the first output of models that return several."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.flatten(out, 1)


@contextmanager
def no_tf32() -> Iterator[None]:
    """Exact fp32 on CUDA: cuDNN convolutions run in TF32 by default on Ampere and later
    (about 1e-3 relative error), which an fp32 cache must not contain."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class ExportedEngine(Engine):
    """The model's ONNX export run by another runtime on CPU (ONNX Runtime, OpenVINO)."""

    name: str
    run: Callable[[np.ndarray], object]  # float32 [B, 3, H, W] -> [B, D]
    precision: PrecisionChoice
    device: torch.device = torch.device("cpu")
    note: str = ""

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return np.asarray(self.run(images.numpy()), dtype=np.float32)


# ----------------------------------------------------------------------------- building


@dataclass
class EngineContext:
    """Everything an engine is built from."""

    model: nn.Module  # eval mode, channels_last where it helps
    device: torch.device
    precision: PrecisionChoice
    batch_size: int
    input_size: int
    work_dir: Path  # <cache dir>/.engines
    identify: Callable[[], str]  # digest of weights and architecture (model_identity), computed only when needed
    channels_last: bool = True
    threads: int = field(default_factory=torch.get_num_threads)

    @cached_property
    def identity(self) -> str:
        return self.identify()

    def eager(self) -> TorchEngine:
        return TorchEngine("eager", self.model, self.precision, self.device, self.channels_last, self.batch_size)


def engines_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / ".engines"


def model_identity(model: nn.Module, provenance: dict) -> str:
    """Digest of what an exported or compiled model depends on: weights, architecture, versions."""
    h = hashlib.sha256(json.dumps(provenance, sort_keys=True, default=str).encode())
    h.update(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(f"torch {torch.__version__}".encode())
    return h.hexdigest()[:20]


def _installed(engine: str) -> bool:
    """Whether the package is there, without importing it (this runs on every `auto` extract)."""
    return importlib.util.find_spec(engine) is not None


def candidates(device: torch.device, precision: PrecisionChoice) -> list[str]:
    """The engines worth measuring for this device and precision (installed ones only)."""
    names = ["eager", "compile"]
    if device.type == "cuda":
        return names + ["cudagraph"]
    if precision.name == "fp32" and _installed("onnxruntime"):
        names.append("onnxruntime")  # no native bf16 on CPU in ONNX Runtime
    if precision.name in ("fp32", "bf16") and _installed("openvino"):
        names.append("openvino")
    return names


class _Flatten(nn.Module):
    """The backbone as exported: one [B, D] output, whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows(self.model(x))


def _onnx_path(ctx: EngineContext) -> Path:
    return ctx.work_dir / f"onnx-{ctx.identity}-{ctx.input_size}px.onnx"


def onnx_file(ctx: EngineContext) -> Path:
    """The model exported to ONNX once (dynamic batch), cached by identity and input size."""
    path = _onnx_path(ctx)
    if path.exists():
        return path
    t0 = time.perf_counter()
    model = _Flatten(ctx.model).eval()
    example = torch.randn(2, 3, ctx.input_size, ctx.input_size)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
            torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, dynamo=False)
    except Exception as exc:
        raise EngineUnavailable(f"cannot export to ONNX: {type(exc).__name__}: {_first_line(exc)}") from exc
    logger.info(f"exported the model to ONNX in {time.perf_counter() - t0:.1f}s (kept in {path})")
    return path


def _build_compile(ctx: EngineContext) -> TorchEngine:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((ctx.work_dir / "inductor").resolve())  # inductor reads it at each use
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: folded convolutions and layouts
    return TorchEngine("compile", torch.compile(ctx.model, dynamic=False), ctx.precision, ctx.device, ctx.channels_last, ctx.batch_size)


def _build_cudagraph(ctx: EngineContext) -> CudaGraphEngine:
    """Warm up on a side stream (cuDNN picks its kernels), then capture one forward, with the
    run's precision (autocast, or exact fp32 without TF32) fixed into the graph."""
    if ctx.device.type != "cuda":
        raise EngineUnavailable("CUDA graphs need a CUDA device")
    memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
    static_in = torch.zeros(ctx.batch_size, 3, ctx.input_size, ctx.input_size, device=ctx.device).contiguous(memory_format=memory_format)
    autocast = torch.autocast("cuda", dtype=ctx.precision.dtype) if ctx.precision.dtype is not None else nullcontext()
    exact = no_tf32() if ctx.precision.dtype is None else nullcontext()
    current = torch.cuda.current_stream(ctx.device)
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), autocast, exact:
        with torch.cuda.stream(side):
            for _ in range(3):
                ctx.model(static_in)
        current.wait_stream(side)
        with torch.cuda.graph(graph):
            static_out = _rows(ctx.model(static_in)).float()
    return CudaGraphEngine("cudagraph", graph, static_in, static_out, ctx.precision, ctx.device)


def _build_onnxruntime(ctx: EngineContext) -> ExportedEngine:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal the decoder's core
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file(ctx)), options, providers=["CPUExecutionProvider"])
    return ExportedEngine("onnxruntime", lambda x: session.run(None, {"images": x})[0], ctx.precision)


def _build_openvino(ctx: EngineContext) -> ExportedEngine:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if ctx.precision.name == "bf16" else "f32",  # OpenVINO picks bf16 itself on AMX: never for exact
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": ctx.threads, "CACHE_DIR": str(ctx.work_dir / "openvino")}
    compiled = core.compile_model(core.read_model(str(onnx_file(ctx))), "CPU", config)
    return ExportedEngine("openvino", lambda x: compiled(x)[0], ctx.precision)


BUILDERS: dict[str, Callable[[EngineContext], Engine]] = {
    "compile": _build_compile, "cudagraph": _build_cudagraph, "onnxruntime": _build_onnxruntime, "openvino": _build_openvino}


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else ""


def build_checked(name: str, ctx: EngineContext) -> Engine:
    """Engine ``name`` for ``ctx``, checked against eager on a probe batch (seeded).

    Raises EngineUnavailable (not installed, cannot build, or differs from eager)."""
    if name == "eager":
        return ctx.eager()
    if name in INSTALL_HINT and not _installed(name):
        raise EngineUnavailable(f"not installed ({INSTALL_HINT[name]})")
    if name == "onnxruntime" and ctx.precision.name != "fp32":
        raise EngineUnavailable(f"runs only exact fp32 here, not {ctx.precision.name}")
    if name in INSTALL_HINT and ctx.device.type != "cpu":
        raise EngineUnavailable(f"used on CPU only; on {ctx.device.type} use eager or compile")
    t0 = time.perf_counter()
    try:
        engine = BUILDERS[name](ctx)
        # a compiled engine is built for the full batch shape (its first call compiles it);
        # the others take any batch, and two rows are enough to compare
        rows = ctx.batch_size if name == "compile" else min(2, ctx.batch_size)
        probe = torch.randn(rows, 3, ctx.input_size, ctx.input_size, generator=torch.Generator().manual_seed(0))
        got = engine.embed(probe)[:2]
    except EngineUnavailable:
        raise
    except Exception as exc:  # no compiler, an unsupported operator, ...
        raise EngineUnavailable(f"cannot run here ({type(exc).__name__}: {_first_line(exc)})") from exc
    seconds = time.perf_counter() - t0
    want = ctx.eager().embed(probe[:2])  # two rows are enough to compare, and cheap in eager
    tolerance = EXACT_RTOL if ctx.precision.dtype is None else REDUCED_RTOL
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    if not np.isfinite(err) or err > tolerance:
        raise EngineUnavailable(f"differs from eager by {err:.1e} (limit {tolerance:.0e})")
    engine.note = f"engine {name}: ready in {seconds:.1f}s, max relative difference to eager {err:.1e}"
    return engine


def measure(engine: Engine, batch: torch.Tensor, min_seconds: float = 1.5, min_batches: int = 2) -> float:
    """Images/s of ``engine`` alone on ``batch`` after one warm-up batch."""
    engine.embed(batch)
    done, t0 = 0, time.perf_counter()
    while done < min_batches or time.perf_counter() - t0 < min_seconds:
        engine.embed(batch)
        done += 1
    return done * len(batch) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- choosing


def machine_key(device: torch.device, threads: int) -> str:
    """What an engine measurement depends on besides the model: the processor and the libraries."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)} cc{torch.cuda.get_device_capability(device)}"
    else:
        hw = f"{platform.processor() or platform.machine()} {json.dumps(cpu_summary(), sort_keys=True)} threads={threads}"
    versions = " ".join(f"{m}={_version(m)}" for m in ("onnxruntime", "openvino"))
    return f"{hw} torch={torch.__version__} {versions}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def choice_path(ctx: EngineContext) -> Path:
    key = hashlib.sha256(f"{ctx.identity} {ctx.input_size} {ctx.batch_size} {ctx.precision.name} {machine_key(ctx.device, ctx.threads)}".encode()).hexdigest()[:20]
    return ctx.work_dir / f"choice-{key}.json"


@dataclass
class Tuning:
    """What measuring the engines here found: images/s per engine (None: unavailable, and why)."""

    rates: dict[str, float | None]
    reasons: dict[str, str]
    best: str
    engine: Engine

    def summary(self) -> str:
        return _format_rates(self.rates)


def tune(ctx: EngineContext, names: Iterable[str] | None = None, min_seconds: float = 1.5) -> Tuning:
    """Build, check and time each candidate engine on random tensors; remember the fastest."""
    # on the engine's device: an engine alone is timed without the copy in (extraction copies
    # uint8 pixels, a quarter of these floats, on a side stream)
    batch = torch.randn(ctx.batch_size, 3, ctx.input_size, ctx.input_size, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    rates: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    built: dict[str, Engine] = {}
    build_seconds: dict[str, float] = {}
    for name in names or candidates(ctx.device, ctx.precision):
        try:
            t0 = time.perf_counter()
            built[name] = build_checked(name, ctx)
            build_seconds[name] = round(time.perf_counter() - t0, 2)
            rates[name] = measure(built[name], batch, min_seconds)
        except EngineUnavailable as exc:
            rates[name], reasons[name] = None, str(exc)
            logger.info(f"engine {name} skipped: {exc}")
    best = max((n for n in rates if rates[n]), key=lambda n: rates[n])
    choice = {"engine": best, "images_per_s": rates, "build_seconds": build_seconds, "skipped": reasons, "precision": ctx.precision.name,
              "batch_size": ctx.batch_size, "machine": machine_key(ctx.device, ctx.threads), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(choice_path(ctx)) as tmp:
        tmp.write_text(json.dumps(choice, indent=1))
    return Tuning(rates, reasons, best, built[best])


def _is_warm(name: str, ctx: EngineContext) -> bool:
    """Whether building ``name`` costs only a load (its export / compile cache exists)."""
    if name == "eager":
        return True
    if name == "compile":
        folder = ctx.work_dir / "inductor"
        return folder.is_dir() and any(folder.rglob("*"))
    return _onnx_path(ctx).exists()


def build_engine(requested: str, ctx: EngineContext, n_images: int) -> Engine:
    """The engine to extract ``n_images`` with; see the module doc. An explicitly requested
    engine that cannot run here falls back to eager with the reason (not installed: an error)."""
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: choose one of {', '.join(ENGINES)}")
    if requested in INSTALL_HINT and not _installed(requested):
        raise UsageError(f"--engine {requested} needs the {requested} package: {INSTALL_HINT[requested]} (or --engine auto)")
    if requested == "eager" or n_images == 0:
        return ctx.eager()
    if requested != "auto":
        return _build_or_eager(requested, ctx)
    remembered = _remembered(ctx)
    if ctx.device.type == "cuda" and remembered is None:
        # compiling a model on a GPU takes tens of seconds, which only long jobs repay: auto does not
        # measure it unasked (`featcache engines` does; then the choice below applies). A CUDA graph
        # of the eager model is captured in under a second and frees the thread that feeds the GPU:
        # on an H200 (bench/extract.py --device cuda, resnet50, --decode gpu) extraction ran 9-14 %
        # faster than eager (bf16 6,598 vs 6,075 img/s; fp32 2,933 vs 2,581), alone only 1-2 %.
        if n_images >= CUDA_GRAPH_MIN_BATCHES * ctx.batch_size:
            logger.info("engine auto -> cudagraph: the eager model captured as one CUDA graph (compile is not measured for this GPU yet: "
                        f"`{command_hint('engines --model ... --device cuda')}`)")
            return _build_or_eager("cudagraph", ctx)
        return ctx.eager()
    if remembered is not None:
        best, rates, build_seconds = remembered
        name = quickest_for(n_images, rates, build_seconds) or best
        if name != best:
            logger.info(f"engine auto -> {name}, not {best} (measured fastest): for {n_images} images {best}'s start-up in a new process "
                        f"({WARM_START_SHARE.get(best, 0) * build_seconds.get(best, 0):.1f}s estimated) outweighs its speed")
        if name == "eager" or _is_warm(name, ctx) or n_images >= AUTO_REBUILD_MIN_IMAGES:
            logger.info(f"engine auto -> {name}: measured fastest on this machine ({_format_rates(rates)}; {choice_path(ctx)})")
            return _build_or_eager(name, ctx)
        logger.info(f"engine auto -> eager: {name} was measured fastest here but its export/compile cache is cold, "
                    f"which {n_images} images do not repay (from {AUTO_REBUILD_MIN_IMAGES})")
        return ctx.eager()
    names = candidates(ctx.device, ctx.precision)
    if n_images < AUTO_TUNE_MIN_IMAGES or len(names) == 1:
        logger.info(f"engine auto -> eager: {n_images} images do not repay measuring {', '.join(names[1:]) or 'other engines'} once "
                    f"(from {AUTO_TUNE_MIN_IMAGES} images; `{command_hint('engines --model ...')}` measures ahead of time)")
        return ctx.eager()
    logger.info(f"engine auto: measuring {', '.join(names)} once for this model and machine ({n_images} images repay it)")
    tuning = tune(ctx, names)
    logger.info(f"engine auto -> {tuning.best}: {tuning.summary()} (remembered in {choice_path(ctx)})")
    return tuning.engine


def _build_or_eager(name: str, ctx: EngineContext) -> Engine:
    try:
        engine = build_checked(name, ctx)
    except EngineUnavailable as exc:
        logger.info(f"engine {name} unavailable: {exc}; extracting in eager")
        return ctx.eager()
    logger.info(engine.note)
    return engine


def _remembered(ctx: EngineContext) -> tuple[str, dict, dict] | None:
    try:
        choice = json.loads(choice_path(ctx).read_text())
        return str(choice["engine"]), dict(choice["images_per_s"]), dict(choice.get("build_seconds") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quickest_for(n_images: int, rates: dict[str, float | None], build_seconds: dict[str, float]) -> str | None:
    """The engine that finishes ``n_images`` soonest counting its warm start in a new process
    (``WARM_START_SHARE`` of its measured cold build); None when the build times are unknown
    (a choice file from before they were recorded)."""
    timed = {n: r for n, r in rates.items() if r and (n == "eager" or n in build_seconds)}
    if not build_seconds or not timed:
        return None
    return min(timed, key=lambda n: WARM_START_SHARE.get(n, 0.5) * build_seconds.get(n, 0.0) + n_images / timed[n])


def _format_rates(rates: dict) -> str:
    return ", ".join(f"{n} {r:.1f}" if r else f"{n} n/a" for n, r in rates.items()) + " img/s"
