"""The embedded demo dataset: scikit-learn's handwritten digits as an image folder.

``load_digits()`` ships inside scikit-learn (no download): 1,797 real 8x8 grey digits in
10 classes. Written out upscaled as RGB PNGs in an ImageFolder tree, it is small, offline,
deterministic, and a head must really learn to separate it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_CLASSES = [f"digit_{d}" for d in range(10)]


def write_digits(root: str | Path, size: int = 64, per_class: int | None = None, split: bool = False, seed: int = 0) -> Path:
    """Write the digits under ``root`` (ImageFolder, or train/val when ``split``); idempotent.

    ``per_class`` keeps the first N images of each class (fast tests); ``split`` puts a
    deterministic 80/20 of each class into ``train/`` and ``val/``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {c: 0 for c in range(10)}
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        target = int(target)
        if per_class is not None and counts[target] >= per_class:
            continue
        counts[target] += 1
        grey = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        pil = Image.fromarray(255 - grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        sub = ("val" if rng.random() < 0.2 else "train") if split else ""
        folder = root / sub / DIGIT_CLASSES[target] if sub else root / DIGIT_CLASSES[target]
        folder.mkdir(parents=True, exist_ok=True)
        target_path = folder / f"{i:04d}.png"
        if not target_path.exists():
            pil.save(target_path, optimize=False)
    return root
