"""Near-duplicates and the split leaks among them.

Two rows are near-duplicates when their cosine similarity in the whitened space
(``space.py``) reaches the threshold (exact search in blocks: ``similarity.pairs_above``);
a pair is *exact* when the cache recorded the same SHA-256 for both files. With few rows the
space has few components, and in few dimensions unrelated images are often close (in 2-D a
sixth of random directions lie within 0.96 of each other): ``chance_threshold`` raises the
threshold until unrelated rows, as random directions, pass with probability under 1 %. A pair is a
*leak* when its rows sit in different splits (train / val / test): a validation or test
image that is a copy of a training image scores what the model memorised, not what it learnt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .similarity import Pairs, pairs_above

SPLITS = ("train", "val", "test")
CHANCE_PAIRS = 0.01  # expected near-duplicate pairs among unrelated rows that the threshold allows
CEILING = 0.9999  # never above: copies' float32 similarity is 1 within rounding


def chance_threshold(dims: int, rows: int, alpha: float = CHANCE_PAIRS) -> float:
    """The cosine that any of the ``rows * (rows - 1) / 2`` pairs of independent uniform
    directions in ``dims`` dimensions reaches with probability ``alpha`` (Bonferroni): for
    one pair, P(cos >= t) = I_{1 - t^2}((dims - 1) / 2, 1 / 2) / 2. Whitened rows of distinct
    images are close to such directions. Capped at ``CEILING``."""
    from scipy.special import betaincinv

    pairs = rows * (rows - 1) / 2
    if dims < 2 or pairs <= 0:
        return CEILING
    x = float(betaincinv((dims - 1) / 2, 0.5, min(1.0, 2 * alpha / pairs)))
    return min(CEILING, float(np.sqrt(max(0.0, 1.0 - x))))


@dataclass
class Duplicates:
    pairs: Pairs
    exact: np.ndarray  # [P] bool: same file bytes
    leak: np.ndarray  # [P] bool: the two rows are in different splits

    def __len__(self) -> int:
        return len(self.pairs)

    def counts(self, split: np.ndarray) -> dict[str, int]:
        """pairs, leaks, exact pairs, rows in any pair, and the val / test rows that copy a training row."""
        p = self.pairs
        rows = np.unique(np.concatenate([p.i, p.j])) if len(p) else np.zeros(0, dtype=np.int64)
        out = {"pairs": len(p), "pairs_found": int(p.found), "exact_pairs": int(self.exact.sum()), "rows": int(len(rows)), "leaks": int(self.leak.sum())}
        for s in ("val", "test"):
            a, b = split[p.i], split[p.j]
            copies = np.concatenate([p.i[(a == s) & (b == "train")], p.j[(b == s) & (a == "train")]])
            out[f"{s}_copies_of_train"] = int(len(np.unique(copies)))
        return out


def leak_mask(i: np.ndarray, j: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Pairs whose rows are in two different splits among train, val and test."""
    a, b = split[i], split[j]
    return (a != b) & np.isin(a, SPLITS) & np.isin(b, SPLITS)


def find_duplicates(U: np.ndarray, threshold: float, split: np.ndarray, sha256: np.ndarray | None = None, *, max_pairs: int = 10_000,
                    device: str = "auto") -> Duplicates:
    """Near-duplicate pairs of the unit rows ``U`` (most similar first, at most ``max_pairs``),
    each marked exact (same SHA-256, when ``sha256`` [N, 32] is given and not all zeros) and leak."""
    pairs = pairs_above(U, threshold, max_pairs=max_pairs, device=device)
    if sha256 is not None and len(pairs):
        a, b = sha256[pairs.i], sha256[pairs.j]
        exact = (a == b).all(axis=1) & a.any(axis=1)
    else:
        exact = np.zeros(len(pairs), dtype=bool)
    return Duplicates(pairs, exact, leak_mask(pairs.i, pairs.j, np.asarray(split)))


def with_split(d: Duplicates, split: np.ndarray) -> Duplicates:
    """The same pairs judged against another split (a head's own split rule)."""
    return Duplicates(d.pairs, d.exact, leak_mask(d.pairs.i, d.pairs.j, np.asarray(split)))
