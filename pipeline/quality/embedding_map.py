"""A 2-D map of the embeddings: PCA (the first two principal components, every row up to
``PCA_MAX_POINTS``), or UMAP / t-SNE on a seeded sample of rows (they cost far more per row)
run on the first 50 whitened components, as both methods' authors recommend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .space import EmbeddingSpace

PCA_MAX_POINTS = 200_000  # a scatter of more draws the same picture, slower
NEIGHBOUR_INPUT_DIMS = 50


@dataclass
class EmbeddingMap:
    xy: np.ndarray  # [M, 2]
    rows: np.ndarray  # [M] which rows (indices into the rows mapped)
    method: str
    note: str


def _sample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def check_map_method(method: str) -> None:
    """Refuse up front a map whose package is missing (before minutes of other work).

    Raises:
        UsageError: ``umap`` without the umap-learn package.
    """
    import importlib.util

    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise UsageError("--map umap needs the umap-learn package: pip install -e '.[umap]' (or use --map pca, or --map tsne with "
                         "scikit-learn alone)")


def embedding_map(space: EmbeddingSpace, whitened: np.ndarray, method: str = "pca", *, max_points: int = 5000, seed: int = 0) -> EmbeddingMap:
    """2-D coordinates of (a sample of) the rows, from their coordinates in ``space``
    (``whitened``, [N, k]): PCA is the first two unwhitened, the others start from them.

    Raises:
        UsageError: ``umap`` without the umap-learn package.
    """
    n = len(whitened)
    if method == "pca":
        rows = _sample(n, PCA_MAX_POINTS, seed)
        xy = (whitened[rows, :2] * np.sqrt(space.variances[:2])).astype(np.float32)
        share = float(space.variances[:2].sum() / space.total_variance) if space.total_variance > 0 else 1.0
        flat = xy.shape[1] < 2  # the rows span one direction (e.g. two distinct embeddings, each repeated)
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
        return EmbeddingMap(xy, rows, "pca", f"PCA: the first two principal components ({100 * share:.1f} % of the variance)"
                            + (" (the rows span only one direction: the vertical axis is 0)" if flat else "")
                            + (f", {len(rows):,} of {n:,} rows drawn at random" if len(rows) < n else ""))
    rows = _sample(n, max_points, seed)
    Z = whitened[rows, :NEIGHBOUR_INPUT_DIMS]
    sampled = f" of {len(rows):,} rows drawn at random from {n:,}" if len(rows) < n else f" of all {len(rows):,} rows"
    if method == "umap":
        check_map_method(method)
        import umap  # type: ignore[import-not-found]

        xy = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(rows) - 1)).fit_transform(Z)
        return EmbeddingMap(np.asarray(xy, dtype=np.float32), rows, "umap", f"UMAP{sampled} (on {Z.shape[1]} whitened principal components)")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(Z)
        return EmbeddingMap(np.asarray(xy, dtype=np.float32), rows, "tsne", f"t-SNE{sampled} (on {Z.shape[1]} whitened principal components)")
    raise UsageError(f"--map {method!r}: choose one of pca, umap, tsne")
