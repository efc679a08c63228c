"""Near-duplicate pairs of many rows through an approximate nearest-neighbour index (FAISS),
and the recall of that search measured against exact search.

Exact blocked search (``similarity.pairs_above``) costs N² x dims: minutes at a few hundred
thousand rows on 2 cores, hours at millions. Above ``ANN_MIN_ROWS`` the audit searches an
inverted-file index instead (FAISS ``IndexIVFScalarQuantizer``, inner product on the unit rows:
cosine): the rows are clustered into ``nlist`` cells (about 4 x sqrt(N), trained on a seeded
sample), stored as 8-bit codes (a quarter of float32: 1.3 GB at 10 M x 128), and each row's
range search visits its ``nprobe`` nearest cells; every candidate the codes put near the
threshold is re-scored exactly from the rows, so the similarities reported are exact. A
near-duplicate is by definition very close to its row, so it almost always sits in one of the
few nearest cells; how often it does not is measured, not assumed: ``measured_recall`` searches
a seeded sample of rows exactly against every row and reports the share of those pairs the
index found (printed by the audit, goal >= 0.95).

Without FAISS (``pip install 'featcache[ann]'``) a large collection is searched exactly
among a seeded sample of ``ANN_MIN_ROWS`` rows, and the audit says so: never a silent
O(N²) run of hours.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..devices import head_device
from ..errors import UsageError
from .similarity import PairCollector, Pairs
from .spill import SpilledRows

ANN_MIN_ROWS = 200_000  # from here `auto` uses the index (exact search: ~1 minute at this size on 2 cores, then growing with N²)
RECALL_QUERIES = 2_000  # rows searched exactly against every row to measure the index's recall
RECALL_BLOCK_ROWS = 8_192  # rows those queries are compared with at a time
QUERY_ROWS = 16_384  # rows range-searched at a time (bounds the result lists held at once)
FULL_PROBE_ROWS = 1_000_000  # up to here every query probes 16 cells; beyond, fewer (``IndexShape.for_rows``)
MIN_PROBES = 4
KMEANS_ITERATIONS = 10  # FAISS's default is 25: the cells only route queries, and 10 cost 93 s at 10 M rows, not 230
QUANTIZED_SLACK = 0.02  # candidates this far below the threshold are re-scored exactly (8-bit components, one range for all: max error 0.006 on 21,500 pairs of 128-d unit rows)
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
        """About 4 sqrt(N) cells (FAISS's guideline for IVF), each query visiting the 16 nearest
        up to ``FULL_PROBE_ROWS`` rows, fewer beyond (a query scans nprobe x N / nlist rows, so
        the search grows as N^1.5 at a fixed nprobe): a near-duplicate sits in its row's nearest
        cells. On 300,000 x 128 isotropic rows with 1,000 planted copies (``bench/near_duplicates.py``,
        2,190 cells): 16 probed found all of them in 0.15 of exact search's time; 4 probed, 99.4 %
        in 0.07; 68 probed, all in 0.47. The recall is measured on every run (``measured_recall``)."""
        nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))
        nprobe = max(MIN_PROBES, min(16, round(16 * math.sqrt(FULL_PROBE_ROWS / max(n, 1)))))
        return IndexShape(nlist, min(nlist, nprobe), min(n, max(39 * nlist, 50_000)))


def approximate_pairs_above(U: np.ndarray, threshold: float, *, max_pairs: int = 10_000, exclude_groups: np.ndarray | None = None,
                            seed: int = 0, shape: IndexShape | None = None, index_bytes: int | None = None) -> Pairs:
    """``similarity.pairs_above`` through an IVF index: every pair (i < j) of unit rows the
    range search finds at cosine >= ``threshold``, the ``max_pairs`` most similar kept.

    The index stores each row in 8 bits a component (``IndexIVFScalarQuantizer``: N x (k + 8)
    bytes with its ids, 1.4 GB at 10 M x 128 where float32 would hold 5 GB), so its
    similarities are approximate: it returns every candidate within ``QUANTIZED_SLACK`` below
    the threshold, and each candidate's cosine is then computed exactly from ``U`` (in memory
    or on disk), as the exact search would. Each row's cells are found once (the coarse search
    is most of the cost at 10 M rows), kept on disk (``spill.SpilledRows``) when ``U`` is.

    ``index_bytes`` bounds the index: the rows go in in shards of that size, one after the
    other, sharing the trained cells; each shard is searched by the rows before its end (a
    pair i < j is found from i in j's shard), so nothing is searched twice and a shard's
    queries scan only its share of each cell."""
    from faiss.contrib.ivf_tools import add_preassigned, range_search_preassigned

    faiss = require_faiss()
    n, d = U.shape
    shape = shape or IndexShape.for_rows(n)
    quantizer = faiss.IndexFlatIP(d)
    trained = faiss.IndexIVFScalarQuantizer(quantizer, d, shape.nlist, faiss.ScalarQuantizer.QT_8bit_uniform, faiss.METRIC_INNER_PRODUCT)
    trained.cp.niter = KMEANS_ITERATIONS
    sample = np.sort(np.random.default_rng(seed).choice(n, shape.train_rows, replace=False))
    trained.train(np.ascontiguousarray(U[sample], dtype=np.float32))
    on_disk = not isinstance(U, np.ndarray)
    if on_disk:
        beside = getattr(U, "beside", None) or Path(tempfile.gettempdir()) / "near-duplicates"
        cells, coarse = SpilledRows(n, shape.nprobe, beside, "cells", np.int64), SpilledRows(n, shape.nprobe, beside, "coarse")
    else:
        cells, coarse = np.empty((n, shape.nprobe), dtype=np.int64), np.empty((n, shape.nprobe), dtype=np.float32)
    for a in range(0, n, QUERY_ROWS):  # a block at a time: rows on disk (``spill.py``) are never read whole
        dist, ids = quantizer.search(np.ascontiguousarray(U[a : a + QUERY_ROWS], dtype=np.float32), shape.nprobe)
        if on_disk:
            cells.append(ids)
            coarse.append(dist)
        else:
            cells[a : a + len(ids)], coarse[a : a + len(ids)] = ids, dist
    shard_rows = n if index_bytes is None else max(QUERY_ROWS, int(index_bytes) // (2 * (d + 8)))  # codes and ids; lists grow by doubling
    kept = PairCollector(max_pairs)
    for s0 in range(0, n, shard_rows):
        s1 = min(n, s0 + shard_rows)
        index = faiss.clone_index(trained)
        index.nprobe = shape.nprobe
        for a in range(s0, s1, QUERY_ROWS):
            b = min(s1, a + QUERY_ROWS)
            add_preassigned(index, np.ascontiguousarray(U[a:b], dtype=np.float32), np.ascontiguousarray(cells[a:b][:, 0]))
        # a float32 inner product of a row with itself is 1 within rounding: search a hair below
        # the threshold and keep what reaches it, as the exact search does
        for q0 in range(0, s1, QUERY_ROWS):
            q1 = min(s1, q0 + QUERY_ROWS)
            block = np.ascontiguousarray(U[q0:q1], dtype=np.float32)
            lims, _, ids = range_search_preassigned(index, block, float(threshold) - QUANTIZED_SLACK, np.ascontiguousarray(cells[q0:q1]),
                                                    np.ascontiguousarray(coarse[q0:q1]))
            rows = np.repeat(np.arange(q0, q1, dtype=np.int64), np.diff(lims.astype(np.int64)))
            ids = ids.astype(np.int64) + s0
            keep = ids > rows
            if exclude_groups is not None:
                keep &= exclude_groups[rows] != exclude_groups[ids]
            rows, ids = rows[keep], ids[keep]
            if not len(rows):
                continue
            sims = np.einsum("ij,ij->i", block[rows - q0], np.asarray(U[ids], dtype=np.float32))  # exact: the candidates' own rows
            close = sims >= threshold
            if close.any():
                kept.add(rows[close], ids[close], sims[close].astype(np.float32))
        del index
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
    for c0 in range(0, n, RECALL_BLOCK_ROWS):  # [queries, block] similarities at a time: 65 MB, whatever N
        c1 = min(n, c0 + RECALL_BLOCK_ROWS)
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
