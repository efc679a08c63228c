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


_SIDES = np.array(["", "train", "val", "test"], dtype=object)  # one shared string per side: an object array of N references, not N strings


def assign_splits(paths: Sequence[str], labels: np.ndarray, cache_split: Sequence[str], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, SplitRule]:
    """Per row: "train", "val", "test" or "" (unused: unlabeled). ``paths`` and ``cache_split``
    may be lists or arrays; nothing per row is copied into Python lists (at 10 M rows those
    were 2 GB and most of evaluate's memory)."""
    labels = np.asarray(labels)
    given = np.asarray(cache_split)
    if len(given) and (given == "train").any():
        side = np.select([given == "train", given == "val", given == "test"], [1, 2, 3], 0).astype(np.int8)
        side[labels < 0] = 0
        return _SIDES[side], SplitRule("folders", val_fraction, seed)
    u = np.fromiter((_unit_hash(seed, p) for p in paths), dtype=np.float64, count=len(labels))
    side = np.where(labels < 0, 0, np.where(u < val_fraction, 2, 1)).astype(np.int8)
    return _SIDES[side], SplitRule("hash", val_fraction, seed)


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
    return assign_splits(paths, labels, cache_split, share, rule["seed"])[0]
