"""Shared bench helpers: generated photo-like JPEGs in an ImageFolder tree."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Source for a child process: its own peak RSS in MiB. VmHWM, since ru_maxrss survives exec (the parent's peak would leak in).
PEAK_RSS_SOURCE = (
    "def peak_rss_mib():\n"
    "    import resource\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
    "    return int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
)


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 4, processes: int = 1, prefix: str = "") -> Path:
    """Photo-like JPEGs (smooth gradients plus mild noise), written once and reused. With
    ``processes`` > 1 they are written in parallel, each image seeded by its index."""
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [range(k, n, processes) for k in range(processes)]
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_jpegs, [root] * processes, chunks, [size] * processes, [classes] * processes, [prefix] * processes))
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        _write_jpeg(root / f"class_{i % classes}" / f"{prefix}{i:05d}.jpg", size, rng)
    return root


def _write_jpegs(root: Path, indices: range, size, classes: int, prefix: str) -> None:
    for i in indices:
        _write_jpeg(root / f"class_{i % classes}" / f"{prefix}{i:05d}.jpg", size, np.random.default_rng(i))


def _write_jpeg(path: Path, size, rng: np.random.Generator) -> None:
    if path.exists():
        return
    w, h = size
    a, b, c = rng.uniform(0.2, 1.0, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([a * xx / w, b * yy / h, c * (xx + yy) / (w + h)], axis=-1) * 255
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(img).save(tmp, format="JPEG", quality=90)
    tmp.rename(path)


def run_json(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[dict[str, Any], Any]:
    """Run ``cmd``; return the last JSON object it printed on stdout and its resource usage
    (from ``wait4``: the peak RSS of that process alone). Exits with its stderr if it printed none."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=cwd)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}):\n{err[-2000:]}")
    return json.loads(lines[-1]), usage


def hard_features(rows: int, dim: int, classes: int, seed: int = 0, rank: int = 48, separation: float = 0.4, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank class structure through a ReLU: class centres (std ``separation``) plus noise (std
    ``spread``) in ``rank`` dimensions, mixed into ``dim``. The defaults overlap: a linear probe
    reaches ~55 %, not 100 % (bench/fit_head.py); bench/report.py separates them more (~98 %)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (rank, dim)).astype(np.float32) / np.sqrt(rank)
    centres = rng.normal(0, separation, (classes, rank)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    X = np.empty((rows, dim), dtype=np.float32)
    for s in range(0, rows, 10_000):
        z = centres[y[s : s + 10_000]] + rng.normal(0, spread, (len(y[s : s + 10_000]), rank)).astype(np.float32)
        X[s : s + 10_000] = np.maximum(z @ mix + rng.normal(0, 0.3, (len(z), dim)).astype(np.float32), 0)
    return X, y
