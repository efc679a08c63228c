"""Train/val/test assignment for cached rows.

Pre-split data keeps its folders' split. Otherwise each labelled row goes to val when a
hash of (seed, relative path) falls below ``val_fraction``: deterministic, stable when the
cache grows (an image never changes side because others were added), and stratified in
expectation within every class. Unlabeled rows are never used for training.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_VAL_FRACTION, DEFAULT_SEED = 0.2, 0  # fit-head's defaults


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


def recorded_rule(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The split rule an artifact was fitted with (fit-head's defaults where it records none)."""
    rule = dict(provenance.get("split_rule") or {})
    rule.setdefault("val_fraction", DEFAULT_VAL_FRACTION)
    rule.setdefault("seed", DEFAULT_SEED)
    return rule


def split_as_recorded(provenance: Mapping[str, Any], paths: Sequence[str], labels: np.ndarray, cache_split: Sequence[str],
                      val_fraction: float | None = None) -> np.ndarray:
    """Per row, the side an artifact's own split rule puts it on (``val_fraction``: another
    validation share instead of the recorded one, as ``evaluate --val-fraction``)."""
    rule = recorded_rule(provenance)
    share = rule["val_fraction"] if val_fraction is None else val_fraction
    return assign_splits(list(paths), labels, list(cache_split), share, rule["seed"])[0]
