"""The space every data-quality check works in: the embeddings centred, projected on their
top principal components and whitened (each component scaled to unit variance).

Why whitened: backbone features share a large common component (with random-init resnet18 a
digit's nearest other digit is at 0.9996 raw cosine, the median; centred, distinct digits still
reach 0.997 while a shrunk JPEG copy of an image can fall to 0.980), so no raw threshold
separates copies from look-alikes. PCA-whitening learned on the collection itself is the standard fix of
image retrieval (Jégou & Chum, ECCV 2012): a copy stays a copy under any linear map, while
distinct images spread out (copies >= 0.992, distinct <= 0.911 on the same digits). The
number of components is at most a quarter of the rows, so a small collection is not
whitened into noise.

One pass over the rows for the mean, one for the covariance (float32 products summed in
float64, chunk by chunk: memory ~ D x D, whatever N), then the top components by LAPACK's
``evr`` driver (only those eigenpairs). The 2-D PCA map is the first two projections,
unwhitened.

Degenerate collections: a direction whose variance is under ``RANK_TOLERANCE`` of the largest
is rounding, not data, and is not kept (whitening would blow that noise up to unit variance):
the float32 products leave 1e-8 to 4e-7 of the largest variance on directions that low-rank
rows (rank 3 to 50, 512 to 2,048 dims) do not span, where the 128th component of the demo
digits carries 1e-4. So 10 distinct rows repeated 100 times have at most 9 components, and
rows that are all the same vector have none (``EmbeddingSpace.dims == 0``: the audit then says
what it could not assess).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

CHUNK_ROWS = 8192
MIN_ROWS = 3  # fewer rows have no components to speak of
RANK_TOLERANCE = 1e-5  # variance kept on a component, relative to the largest (module doc)


@dataclass
class EmbeddingSpace:
    mean: np.ndarray  # [D] float64
    components: np.ndarray  # [D, k] float32, columns by decreasing variance
    variances: np.ndarray  # [k] float64: the eigenvalues (variance along each component)
    total_variance: float

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained(self) -> float:
        """Share of the total variance the kept components carry."""
        return float(self.variances.sum() / self.total_variance) if self.total_variance > 0 else 1.0

    def project(self, X: np.ndarray, whiten: bool = True, dims: int | None = None) -> np.ndarray:
        """[N, k] float32 coordinates of ``X`` (chunked; ``dims`` keeps the first few)."""
        k = self.dims if dims is None else min(dims, self.dims)
        V = torch.from_numpy(np.ascontiguousarray(self.components[:, :k]))
        mean = torch.from_numpy(self.mean.astype(np.float32))
        scale = torch.from_numpy((1.0 / np.sqrt(self.variances[:k])).astype(np.float32)) if whiten else None
        out = np.empty((len(X), k), dtype=np.float32)
        for s in range(0, len(X), CHUNK_ROWS):
            block = (torch.from_numpy(np.asarray(X[s : s + CHUNK_ROWS], dtype=np.float32)) - mean) @ V
            out[s : s + len(block)] = (block * scale if scale is not None else block).numpy()
        return out


def component_count(n_rows: int, dim: int, wanted: int) -> int:
    """Components kept: ``wanted`` (0 = every one), at most the width and a quarter of the rows
    (at least 2, so a tiny collection still has a map)."""
    k = dim if wanted <= 0 else min(wanted, dim)
    return max(1, min(k, max(2, n_rows // 4), n_rows - 1, dim))


def fit_space(X: np.ndarray, dims: int = 256, order: np.ndarray | None = None) -> EmbeddingSpace:
    """Principal components of the rows of ``X`` ([N, D], any float dtype), see the module doc.
    ``order``: the rows' visiting order, chunk by chunk (a cache's storage order: rows on disk
    are then read in runs, not gathered from all over the file); the sums depend on it only
    in their rounding.

    Raises:
        ValueError: fewer than ``MIN_ROWS`` rows (no components to speak of).
    """
    n, d = X.shape
    if n < MIN_ROWS:
        raise ValueError(f"a space needs at least {MIN_ROWS} rows (got {n})")
    chunk = (lambda s: X[s : s + CHUNK_ROWS]) if order is None else (lambda s: X[order[s : s + CHUNK_ROWS]])
    total = np.zeros(d, dtype=np.float64)
    for s in range(0, n, CHUNK_ROWS):
        total += np.asarray(chunk(s), dtype=np.float64).sum(axis=0)
    mean = total / n
    gram = torch.zeros(d, d, dtype=torch.float64)
    mean32 = torch.from_numpy(mean.astype(np.float32))
    for s in range(0, n, CHUNK_ROWS):
        block = torch.from_numpy(np.asarray(chunk(s), dtype=np.float32)) - mean32
        gram += (block.T @ block).double()
    cov = (gram / (n - 1)).numpy()
    k = component_count(n, d, dims)
    values, vectors = scipy.linalg.eigh(cov, subset_by_index=[d - k, d - 1], driver="evr")
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = values > max(values[0], 0.0) * RANK_TOLERANCE  # directions the rows span (module doc); none when every row is the same
    vectors = vectors[:, keep] * np.sign(vectors[np.abs(vectors[:, keep]).argmax(axis=0), np.flatnonzero(keep)])  # sign: largest entry positive
    return EmbeddingSpace(mean, np.ascontiguousarray(vectors, dtype=np.float32), values[keep], float(np.trace(cov)))
