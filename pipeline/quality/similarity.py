"""Exact cosine search in blocks: every pair above a threshold, and each query's top k.

Rows are unit vectors (float32). The similarity matrix is never held whole: a block of
``block_rows`` x ``block_cols`` (128 MiB at the defaults) is computed, searched and dropped,
so memory is the rows themselves plus one block, whatever N. Brute force, so nothing is
approximate; a matrix product per block on the GPU when there is one (``device="auto"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..devices import head_device

BLOCK_ROWS = 2048
BLOCK_COLS = 16384


def unit_rows(Z: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), float32."""
    Z = np.asarray(Z, dtype=np.float32)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.maximum(norms, 1e-12)


class _Rows:
    """Blocks of ``U`` on ``device``: all of it moved once when it is in memory and fits
    comfortably, else per block (rows on disk, ``spill.py``, are read a block at a time)."""

    def __init__(self, U: np.ndarray, device: torch.device):
        in_memory = isinstance(U, np.ndarray)
        self.U = np.ascontiguousarray(U, dtype=np.float32) if in_memory else U
        self.device = device
        whole = in_memory and (device.type == "cpu" or self.U.nbytes < torch.cuda.mem_get_info(device)[0] // 4)
        self.on_device = torch.from_numpy(self.U).to(device) if whole else None

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self.on_device is not None:
            return self.on_device[start:stop]
        return torch.from_numpy(np.ascontiguousarray(self.U[start:stop], dtype=np.float32)).to(self.device, non_blocking=True)


@dataclass
class Pairs:
    """Pairs (i < j) with similarity at or above a threshold, most similar first."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray
    found: int  # how many there were; more than len(i) when ``max_pairs`` cut the list
    threshold: float

    def __len__(self) -> int:
        return len(self.i)

    @property
    def truncated(self) -> bool:
        return self.found > len(self.i)


def pairs_above(U: np.ndarray, threshold: float, *, max_pairs: int = 10_000, device: str = "auto", block_rows: int = BLOCK_ROWS,
                block_cols: int = BLOCK_COLS, exclude_groups: np.ndarray | None = None) -> Pairs:
    """Every pair of rows of ``U`` (unit vectors) whose cosine similarity is >= ``threshold``;
    at most ``max_pairs`` of them, the most similar. Rows with the same ``exclude_groups``
    label ([N] int) are never paired (copies the caller reports on its own)."""
    dev = head_device(device)
    n = len(U)
    rows = _Rows(U, dev)
    group = torch.from_numpy(np.asarray(exclude_groups, dtype=np.int64)).to(dev) if exclude_groups is not None else None
    kept = PairCollector(max_pairs)
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        A = rows.block(r0, r1)
        for c0 in range(r0, n, block_cols):
            c1 = min(n, c0 + block_cols)
            S = A @ rows.block(c0, c1).T
            hit = S >= threshold
            if c0 < r1:  # the block holds the diagonal: only j > i
                hit &= torch.arange(c0, c1, device=dev)[None, :] > torch.arange(r0, r1, device=dev)[:, None]
            if group is not None:
                hit &= group[r0:r1, None] != group[None, c0:c1]
            a, b = torch.nonzero(hit, as_tuple=True)
            if len(a):
                kept.add((a + r0).cpu().numpy(), (b + c0).cpu().numpy(), S[a, b].float().cpu().numpy())
    return kept.pairs(threshold)


class PairCollector:
    """Pairs arriving in pieces, of which only the ``limit`` most similar are wanted: memory
    stays about twice that, whatever was found (``found`` counts them all)."""

    def __init__(self, limit: int):
        self.limit, self.found, self.held = limit, 0, 0
        self.i: list[np.ndarray] = []
        self.j: list[np.ndarray] = []
        self.s: list[np.ndarray] = []

    def add(self, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> None:
        self.found += len(i)
        self.held += len(i)
        self.i.append(i)
        self.j.append(j)
        self.s.append(s)
        if self.held > 2 * self.limit:  # keep memory bounded: only the most similar survive
            i, j, s = _top_pairs(self.i, self.j, self.s, self.limit)
            self.i, self.j, self.s, self.held = [i], [j], [s], len(i)

    def pairs(self, threshold: float) -> Pairs:
        i, j, s = _top_pairs(self.i, self.j, self.s, self.limit)
        return Pairs(i, j, s, self.found, threshold)


def _top_pairs(i: list[np.ndarray], j: list[np.ndarray], s: list[np.ndarray], limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``limit`` most similar of the pairs held in pieces, most similar first (ties: by row, then column)."""
    if not i:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    i_all, j_all, s_all = np.concatenate(i).astype(np.int64), np.concatenate(j).astype(np.int64), np.concatenate(s)
    order = np.lexsort((j_all, i_all, -s_all))[:limit]
    return i_all[order], j_all[order], s_all[order]


def top_k(queries: np.ndarray, base: np.ndarray, k: int, *, device: str = "auto", exclude: np.ndarray | None = None,
          block_cols: int = BLOCK_COLS * 4) -> tuple[np.ndarray, np.ndarray]:
    """For each query (unit rows), its ``k`` most similar rows of ``base`` (unit rows):
    ([Q, k] indices into ``base``, [Q, k] similarities), most similar first. ``exclude[q]``
    is a row of ``base`` the query must not return (itself), or -1."""
    dev = head_device(device)
    k = min(k, len(base))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    best_s = torch.full((len(q), k), -np.inf, device=dev)
    best_i = torch.zeros((len(q), k), dtype=torch.long, device=dev)
    rows = _Rows(base, dev)
    skip = torch.as_tensor(exclude if exclude is not None else np.full(len(q), -1), device=dev)
    for c0 in range(0, len(base), block_cols):
        c1 = min(len(base), c0 + block_cols)
        S = q @ rows.block(c0, c1).T
        cols = torch.arange(c0, c1, device=dev)
        S[cols[None, :] == skip[:, None]] = -np.inf
        s, idx = torch.topk(torch.cat([best_s, S], 1), k, dim=1)
        best_i = torch.gather(torch.cat([best_i, cols.expand(len(q), -1)], 1), 1, idx)
        best_s = s
    return best_i.cpu().numpy(), best_s.cpu().numpy()
