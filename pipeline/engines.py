"""How the frozen backbone runs: eager PyTorch, or compiled by ``torch.compile`` (inductor,
weights frozen into the graph) — chosen at run time, checked against eager, cached on disk.

A compiled engine must reproduce eager fp32 within the same 1e-4 relative tolerance the
cache is tested against; if it does not (or cannot compile here: no C++ compiler, an
unsupported model), extraction goes on in eager with a message, never silently.
Compilation costs tens of seconds once, so ``auto`` compiles only when the job is big
enough to win it back (or a warm compile cache makes it cheap); inductor's own on-disk
cache, keyed by graph, shapes, dtypes and library versions, lives under the cache folder
so the next cron run does not pay again.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import UsageError
from .hardware import PrecisionChoice

ENGINES = ("auto", "eager", "compile")
# Images below which `auto` stays eager on CPU without a warm compile cache: ~25 s of
# compilation at ~0.02 s/img saved (resnet50, 2 cores) breaks even near 1,300 images.
AUTO_COMPILE_MIN_IMAGES = 2000
AUTO_COMPILE_MIN_IMAGES_WARM = 500  # a warm compile cache still costs a few seconds to load
EXACT_RTOL = 1e-4


@dataclass
class Engine:
    name: str  # "eager" or "compile"
    model: nn.Module
    precision: PrecisionChoice
    device: torch.device
    channels_last: bool
    batch_size: int
    note: str = ""

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """float32 numpy [B, D]. A compiled engine sees one fixed batch shape (the last,
        smaller batch is padded), so it never recompiles mid-run."""
        n = len(images)
        if self.name == "compile" and n < self.batch_size:
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.precision.dtype) if self.precision.dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = torch.flatten(out, 1)
        return out[:n].float().cpu().numpy()


def compile_cache_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / ".compiled"


def _warm_cache(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*"))


def build_engine(requested: str, model: nn.Module, device: torch.device, precision: PrecisionChoice, batch_size: int, input_size: int,
                 n_images: int, cache_dir: Path, log: Callable[[str], None] = lambda m: None, channels_last: bool = True) -> Engine:
    """The engine to extract with; see the module doc."""
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: choose one of {', '.join(ENGINES)}")
    eager = Engine("eager", model, precision, device, channels_last, batch_size)
    if requested == "eager" or n_images == 0:
        return eager
    folder = compile_cache_dir(cache_dir)
    if requested == "auto":
        if device.type == "cuda":
            return eager  # eager keeps a GPU busy here; compiling is opt-in (--engine compile)
        needed = AUTO_COMPILE_MIN_IMAGES_WARM if _warm_cache(folder) else AUTO_COMPILE_MIN_IMAGES
        if n_images < needed:
            log(f"engine auto -> eager: {n_images} images do not repay compiling (from {needed} images with "
                f"{'a warm' if needed == AUTO_COMPILE_MIN_IMAGES_WARM else 'no'} compile cache)")
            return eager
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())  # inductor reads it at each use
    try:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: folded convolutions and layouts
        compiled = torch.compile(model, dynamic=False)
        engine = Engine("compile", compiled, precision, device, channels_last, batch_size)
        t0 = time.perf_counter()
        probe = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        got = engine.embed(probe)[:2]
        seconds = time.perf_counter() - t0
        want = eager.embed(probe[:2])  # two rows are enough to compare, and cheap in eager
    except Exception as exc:  # no compiler, an unsupported operator, ...
        log(f"engine compile unavailable here ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); extracting in eager")
        return eager
    tolerance = EXACT_RTOL if precision.dtype is None else 2e-2
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    if not np.isfinite(err) or err > tolerance:
        log(f"engine compile differs from eager by {err:.1e} (limit {tolerance:.0e}); extracting in eager")
        return eager
    engine.note = f"engine compile: ready in {seconds:.1f}s (compile cache {folder}), max relative difference to eager {err:.1e}"
    log(engine.note)
    return engine
