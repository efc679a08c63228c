"""Near-duplicate pairs of many rows through an approximate nearest-neighbour index (FAISS),
and the recall of that search measured against exact search.

Exact blocked search (``similarity.pairs_above``) costs N² x dims: minutes at a few hundred
thousand rows on 2 cores, hours at millions. Above ``ANN_MIN_ROWS`` the audit searches an
inverted-file index instead (FAISS ``IndexIVFFlat``, inner product on the unit rows: cosine):
the rows are clustered into ``nlist`` cells (about 4 x sqrt(N), trained on a seeded sample),
and each row's range search (every row at or above the threshold) visits its ``nprobe`` (16)
nearest cells. A near-duplicate is by definition very close to its row, so it almost always
sits in one of the few nearest cells; how often it does not is measured, not assumed:
``measured_recall`` searches a seeded sample of rows exactly against every row and reports
the share of those pairs the index found (printed by the audit, goal >= 0.95).

Without FAISS (``pip install 'featcache[ann]'``) a large collection is searched exactly
among a seeded sample of ``ANN_MIN_ROWS`` rows, and the audit says so: never a silent
O(N²) run of hours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..devices import head_device
from ..errors import UsageError
from .similarity import PairCollector, Pairs

ANN_MIN_ROWS = 200_000  # from here `auto` uses the index (exact search: ~1 minute at this size on 2 cores, then growing with N²)
RECALL_QUERIES = 2_000  # rows searched exactly against every row to measure the index's recall
QUERY_ROWS = 16_384  # rows range-searched at a time (bounds the result lists held at once)
INSTALL_HINT = "pip install 'featcache[ann]'"


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def require_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise UsageError(f"--near-duplicates ann needs FAISS, which is not installed: {INSTALL_HINT} (or --near-duplicates exact)") from exc
    return faiss


@dataclass(frozen=True)
class IndexShape:
    nlist: int  # inverted lists (cells)
    nprobe: int  # cells each query visits
    train_rows: int

    @staticmethod
    def for_rows(n: int) -> IndexShape:
        """About 4 sqrt(N) cells (FAISS's guideline for IVF), each query visiting the 16 nearest:
        a near-duplicate sits in its row's nearest cells. On 300,000 x 128 isotropic rows with
        1,000 planted copies (``bench/near_duplicates.py``, 2,190 cells): 16 probed found all of
        them in 0.15 of exact search's time; 4 probed, 99.4 % in 0.07; 68 probed, all in 0.47."""
        nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))
        return IndexShape(nlist, min(nlist, 16), min(n, max(39 * nlist, 50_000)))


def approximate_pairs_above(U: np.ndarray, threshold: float, *, max_pairs: int = 10_000, exclude_groups: np.ndarray | None = None,
                            seed: int = 0, shape: IndexShape | None = None) -> Pairs:
    """``similarity.pairs_above`` through an IVF index: every pair (i < j) of unit rows the
    range search finds at cosine >= ``threshold``, the ``max_pairs`` most similar kept."""
    faiss = require_faiss()
    n, d = U.shape
    shape = shape or IndexShape.for_rows(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, shape.nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(seed).choice(n, shape.train_rows, replace=False))
    index.train(np.ascontiguousarray(U[sample], dtype=np.float32))
    for a in range(0, n, QUERY_ROWS * 4):  # added a block at a time: rows on disk (``spill.py``) are never read whole
        index.add(np.ascontiguousarray(U[a : a + QUERY_ROWS * 4], dtype=np.float32))
    index.nprobe = shape.nprobe
    kept = PairCollector(max_pairs)
    # a float32 inner product of a row with itself is 1 within rounding: search a hair below
    # the threshold and keep what reaches it, as the exact search does
    for q0 in range(0, n, QUERY_ROWS):
        q1 = min(n, q0 + QUERY_ROWS)
        lims, sims, ids = index.range_search(np.ascontiguousarray(U[q0:q1], dtype=np.float32), float(threshold) - 1e-6)
        rows = np.repeat(np.arange(q0, q1, dtype=np.int64), np.diff(lims.astype(np.int64)))
        ids = ids.astype(np.int64)
        keep = (ids > rows) & (sims >= threshold)
        if exclude_groups is not None:
            keep &= exclude_groups[rows] != exclude_groups[np.maximum(ids, 0)]
        if keep.any():
            kept.add(rows[keep], ids[keep], sims[keep].astype(np.float32))
    return kept.pairs(threshold)


def measured_recall(U: np.ndarray, threshold: float, approximate: Pairs, *, exclude_groups: np.ndarray | None = None, seed: int = 0,
                    queries: int = RECALL_QUERIES, device: str = "auto") -> tuple[float | None, int]:
    """(recall, pairs): of the pairs a seeded sample of ``queries`` rows makes with any row at
    ``threshold`` (exact search), the share ``approximate`` holds; None when the sample makes
    no pair. Only meaningful when ``approximate`` was not cut by ``max_pairs``."""
    import torch

    n = len(U)
    picked = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, queries), replace=False))
    dev = head_device(device)
    q = torch.from_numpy(np.ascontiguousarray(U[picked], dtype=np.float32)).to(dev)
    truth: set[tuple[int, int]] = set()
    for c0 in range(0, n, 65_536):
        c1 = min(n, c0 + 65_536)
        S = q @ torch.from_numpy(np.ascontiguousarray(U[c0:c1], dtype=np.float32)).to(dev).T
        a, b = torch.nonzero(S >= threshold, as_tuple=True)
        qi, cj = picked[a.cpu().numpy()], b.cpu().numpy() + c0
        other = qi != cj
        if exclude_groups is not None:
            other &= exclude_groups[qi] != exclude_groups[cj]
        truth.update(zip(np.minimum(qi, cj)[other].tolist(), np.maximum(qi, cj)[other].tolist()))
    if not truth:
        return None, 0
    got = set(zip(approximate.i.tolist(), approximate.j.tolist()))
    return len(truth & got) / len(truth), len(truth)
