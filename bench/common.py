"""Shared bench helpers: generated photo-like JPEGs in an ImageFolder tree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 4) -> Path:
    """Photo-like JPEGs (smooth gradients plus mild noise), written once and reused."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        path = root / f"class_{i % classes}" / f"{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([a * xx / w, b * yy / h, c * (xx + yy) / (w + h)], axis=-1) * 255
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
    return root
