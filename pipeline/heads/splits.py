"""Train/val/test assignment for cached rows.

Pre-split data keeps its folders' split. Otherwise each labelled row goes to val when a
hash of (seed, relative path) falls below ``val_fraction``: deterministic, stable when the
cache grows (an image never changes side because others were added), and stratified in
expectation within every class. Unlabeled rows are never used for training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitRule:
    kind: str  # "folders" or "hash"
    val_fraction: float
    seed: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "val_fraction": self.val_fraction, "seed": self.seed}


def _unit_hash(seed: int, path: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(paths: list[str], labels: np.ndarray, cache_split: list[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, SplitRule]:
    """Per row: "train", "val", "test" or "" (unused: unlabeled)."""
    labels = np.asarray(labels)
    if any(s == "train" for s in cache_split):
        out = np.array([s if l >= 0 else "" for s, l in zip(cache_split, labels)], dtype=object)
        return out, SplitRule("folders", val_fraction, seed)
    out = np.array(["" if l < 0 else ("val" if _unit_hash(seed, p) < val_fraction else "train") for p, l in zip(paths, labels)], dtype=object)
    return out, SplitRule("hash", val_fraction, seed)
