"""Near-duplicates and the split leaks among them.

Two rows are near-duplicates when their cosine similarity in the whitened space
(``space.py``) reaches the threshold (exact search in blocks: ``similarity.pairs_above``; above ``ann.ANN_MIN_ROWS`` rows an
approximate index with its recall measured, ``ann.py``);
a pair is *exact* when the cache recorded the same SHA-256 for both files or their stored
embeddings are byte-identical (imported rows carry no hash). Exact copies are found by content,
not by similarity: they are reported whatever the threshold and whatever the whitening makes of
them (in a collection of identical rows every centred row is zero). A group of k copies gives
k - 1 pairs, each copy against the group's anchor (its first row in train, else in val, else in
test, else its first row), not the k (k - 1) / 2 pairs of every two copies: 10,000 copies of
one image are 9,999 pairs, and every copy in another split than the anchor is a leak. With few rows the
space has few components, and in few dimensions unrelated images are often close (in 2-D a
sixth of random directions lie within 0.96 of each other): ``chance_threshold`` raises the
threshold until unrelated rows, as random directions, pass with probability under 1 %. A pair is a
*leak* when its rows sit in different splits (train / val / test): a validation or test
image that is a copy of a training image scores what the model memorised, not what it learnt.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .ann import ANN_MIN_ROWS, INSTALL_HINT, IndexShape, approximate_pairs_above, have_faiss, measured_recall
from .similarity import Pairs, pairs_above

SPLITS = ("train", "val", "test")
CHANCE_PAIRS = 0.01  # expected near-duplicate pairs among unrelated rows that the threshold allows
CEILING = 0.9999  # never above: copies' float32 similarity is 1 within rounding
CHUNK_ROWS = 2048  # rows keyed at once by ``identical_rows`` (a 16 MiB temporary at 2,048 dims)


def _row_words(block: np.ndarray) -> np.ndarray:
    """The raw bytes of each row of ``block`` as unsigned words (uint32 when the row length allows)."""
    raw = np.ascontiguousarray(block).view(np.uint8).reshape(len(block), -1)
    return raw.view(np.uint32) if raw.shape[1] % 4 == 0 else raw.astype(np.uint32)


def _first_of_equal(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """[n] int64: each of ``rows`` whose value (``values``, aligned with ``rows``) another of
    them shares gets the smallest row index holding that value; every other row -1."""
    out = np.full(n, -1, dtype=np.int64)
    if len(rows) < 2:
        return out
    order = np.argsort(values, kind="stable")  # one sort, then only the rows in runs of equal values (few): ~25 B a row, not np.unique's ~100
    same = values[order[1:]] == values[order[:-1]]
    if not same.any():
        return out
    in_run = np.zeros(len(rows), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    members = order[in_run]  # sorted by value, then by position
    vals = values[members]
    starts = np.r_[True, vals[1:] != vals[:-1]]
    run = np.cumsum(starts) - 1
    first = np.full(int(run[-1]) + 1, n, dtype=np.int64)
    np.minimum.at(first, run, rows[members])
    out[rows[members]] = first[run]
    return out


def identical_rows(X: np.ndarray, chunk_rows: int = CHUNK_ROWS, order: np.ndarray | None = None) -> np.ndarray:
    """[N] int64: for each row whose stored embedding is byte-identical to another row's, the
    first such row; -1 for the others. Needs the embeddings themselves (identical rows may not
    stay identical, or stay apart from zero, once centred and whitened). One vectorised pass
    keys every row by a multiply-add of its bits; only rows whose key repeats are hashed
    (BLAKE2b, 128 bits) to decide, so a collection without copies costs that one pass, in
    ``order`` when given (a cache's storage order: rows on disk read in runs)."""
    n = len(X)
    keys = np.zeros(n, dtype=np.uint64)
    mult = None
    for s in range(0, n, chunk_rows):
        rows = slice(s, s + chunk_rows) if order is None else order[s : s + chunk_rows]
        words = _row_words(np.asarray(X[rows]))
        if mult is None:
            mult = np.random.default_rng(0).integers(1, 2**32, words.shape[1], dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        keys[rows] = (words * mult).sum(axis=1, dtype=np.uint64)
    candidates = np.flatnonzero(_first_of_equal(keys, np.arange(n), n) >= 0)
    digests = np.array([hashlib.blake2b(np.ascontiguousarray(X[r]).tobytes(), digest_size=16).digest() for r in candidates], dtype="V16")
    return _first_of_equal(digests, candidates, n)


def same_file_rows(sha256: np.ndarray | None, n: int) -> np.ndarray:
    """[N] int64: for each row whose recorded SHA-256 another row shares, the first such row;
    -1 for the others and for rows without a hash (all zeros: imported rows)."""
    if sha256 is None:
        return np.full(n, -1, dtype=np.int64)
    sha = np.ascontiguousarray(sha256, dtype=np.uint8).reshape(n, -1)
    rows = np.flatnonzero(sha.any(axis=1))
    return _first_of_equal(sha[rows].view(f"V{sha.shape[1]}").ravel(), rows, n)


def copy_groups(*links: np.ndarray) -> np.ndarray:
    """[N] int64 group label per row: rows linked by any of ``links`` (each [N]: the first row
    of the row's group under one criterion, or -1) share a label, transitively; a row linked
    to none has a label of its own."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(links[0])
    src = np.concatenate([np.flatnonzero(link >= 0) for link in links])
    dst = np.concatenate([link[link >= 0] for link in links])
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def exact_pairs(groups: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j: each row of a group of 2 or more rows paired with the group's anchor,
    its first row in train, else in val, else in test, else its first row (module doc)."""
    n = len(groups)
    rank = np.full(n, len(SPLITS), dtype=np.int64)
    for k, name in enumerate(SPLITS):
        rank[np.asarray(split) == name] = k
    order = np.lexsort((np.arange(n), rank, groups))
    g = groups[order]
    start = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, dtype=bool)
    anchor = order[start][np.cumsum(start) - 1]
    a, b = anchor[~start], order[~start]
    return np.minimum(a, b), np.maximum(a, b)


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


@dataclass(frozen=True)
class NearSearch:
    """How the near-duplicate pairs were searched: ``exact`` (every pair), ``ann`` (the FAISS
    index, ``ann.py``; its recall measured against exact search) or ``sample`` (exact among a
    seeded sample of ``rows`` rows: no FAISS for a collection too large to search whole)."""

    method: str
    rows: int  # rows searched
    total: int  # rows there were
    recall: float | None = None  # ann: share of the exactly searched sample's pairs the index found
    recall_pairs: int = 0  # pairs that share was measured on
    index: IndexShape | None = None

    def note(self) -> str:
        """A line for the audit's notes ("" for a plain exact search)."""
        if self.method == "ann":
            measured = (f"recall {self.recall:.3f} against exact search on the {self.recall_pairs:,} pairs of a seeded sample of rows"
                        if self.recall is not None else "recall not measured (no pair in the sampled rows, or the pairs were cut at --max-pairs)")
            return (f"near-duplicates of {self.total:,} rows searched with an approximate index (FAISS IVF, {self.index.nlist:,} cells, "
                    f"{self.index.nprobe} probed per row): {measured}; --near-duplicates exact searches every pair")
        if self.method == "sample":
            return (f"near-duplicates searched exactly among a seeded sample of {self.rows:,} of {self.total:,} rows: every pair of all of them "
                    f"would take hours; for all rows install FAISS ({INSTALL_HINT}); exact copies (same file or embedding) are listed for all rows")
        return ""


def near_pairs(U: np.ndarray, threshold: float, *, search: str = "auto", max_pairs: int = 10_000, device: str = "auto",
               exclude_groups: np.ndarray | None = None, seed: int = 0, index_bytes: int | None = None) -> tuple[Pairs, NearSearch]:
    """The pairs of unit rows ``U`` at cosine >= ``threshold``, searched as ``search`` says:
    exact, ann (FAISS), or auto: exact below ``ANN_MIN_ROWS`` rows, above it the index, or
    without FAISS exact search among a seeded sample of ``ANN_MIN_ROWS`` rows; ``index_bytes``
    bounds the index (``approximate_pairs_above``)."""
    n = len(U)
    method = search
    if search == "auto":
        method = "exact" if n <= ANN_MIN_ROWS else "ann" if have_faiss() else "sample"
    if method == "exact":
        return pairs_above(U, threshold, max_pairs=max_pairs, device=device, exclude_groups=exclude_groups), NearSearch("exact", n, n)
    if method == "ann":
        shape = IndexShape.for_rows(n)
        pairs = approximate_pairs_above(U, threshold, max_pairs=max_pairs, exclude_groups=exclude_groups, seed=seed, shape=shape, index_bytes=index_bytes)
        recall, measured = (None, 0) if pairs.truncated else measured_recall(U, threshold, pairs, exclude_groups=exclude_groups, seed=seed, device=device)
        return pairs, NearSearch("ann", n, n, recall, measured, shape)
    rows = np.sort(np.random.default_rng(seed).choice(n, ANN_MIN_ROWS, replace=False))
    groups = exclude_groups[rows] if exclude_groups is not None else None
    p = pairs_above(np.ascontiguousarray(U[rows]), threshold, max_pairs=max_pairs, device=device, exclude_groups=groups)
    return Pairs(rows[p.i], rows[p.j], p.similarity, p.found, threshold), NearSearch("sample", len(rows), n)


@dataclass
class Duplicates:
    pairs: Pairs
    exact: np.ndarray  # [P] bool: same file bytes or same stored embedding
    leak: np.ndarray  # [P] bool: the two rows are in different splits
    groups: np.ndarray | None = None  # [N] copy-group label per row (``copy_groups``): re-anchors the exact pairs for another split
    identical: np.ndarray | None = None  # [N] ``identical_rows``
    search: NearSearch | None = None  # how the near pairs were found (None: no space, exact copies only)

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


def _exact_similarity(i: np.ndarray, j: np.ndarray, identical: np.ndarray, U: np.ndarray | None) -> np.ndarray:
    """1 for pairs with byte-identical embeddings, else their cosine in ``U`` (1 without ``U``)."""
    s = np.ones(len(i), dtype=np.float32)
    if U is not None:
        differ = (identical[i] < 0) | (identical[i] != identical[j])
        s[differ] = (U[i[differ]] * U[j[differ]]).sum(axis=1)
    return s


def _merged(exact: tuple[np.ndarray, np.ndarray, np.ndarray], near: Pairs | None, threshold: float, split: np.ndarray, limit: int,
            groups: np.ndarray, identical: np.ndarray, search: NearSearch | None) -> Duplicates:
    """The exact pairs ``(i, j, similarity)`` and the near ones, exact first then most similar, at most ``limit``."""
    empty = np.zeros(0, dtype=np.int64)
    ni, nj, ns = (near.i, near.j, near.similarity) if near is not None else (empty, empty, np.zeros(0, dtype=np.float32))
    i, j = np.concatenate([exact[0], ni]), np.concatenate([exact[1], nj])
    s = np.concatenate([exact[2], ns]).astype(np.float32)
    is_exact = np.r_[np.ones(len(exact[0]), dtype=bool), np.zeros(len(ni), dtype=bool)]
    keep = np.lexsort((j, i, -s, ~is_exact))[:limit]
    pairs = Pairs(i[keep], j[keep], s[keep], len(exact[0]) + (near.found if near is not None else 0), threshold)
    return Duplicates(pairs, is_exact[keep], leak_mask(pairs.i, pairs.j, split), groups, identical, search)


def find_duplicates(U: np.ndarray | None, threshold: float, split: np.ndarray, sha256: np.ndarray | None = None, *,
                    identical: np.ndarray | None = None, max_pairs: int = 10_000, device: str = "auto", search: str = "auto",
                    seed: int = 0, index_bytes: int | None = None) -> Duplicates:
    """The exact copies, then the near-duplicate pairs of the unit rows ``U`` at ``threshold``
    (None: no space to search, exact copies only); each pair marked exact and leak; exact pairs
    first, then the most similar, at most ``max_pairs`` in all.

    Exact: the same SHA-256 (``sha256`` [N, 32], all zeros = no hash) or byte-identical
    embeddings (``identical``, from ``identical_rows``), paired as the module doc says; their
    similarity is 1 for identical embeddings, else their cosine in ``U`` (1 without ``U``).
    The search skips pairs inside a group of copies: those are already reported; ``search``
    ``seed`` and ``index_bytes`` as ``near_pairs``."""
    split = np.asarray(split)
    n = len(split)
    identical = identical if identical is not None else np.full(n, -1, dtype=np.int64)
    groups = copy_groups(same_file_rows(sha256, n), identical)
    ei, ej = exact_pairs(groups, split)
    near, how = (near_pairs(U, threshold, search=search, max_pairs=max_pairs, device=device, exclude_groups=groups, seed=seed, index_bytes=index_bytes)
                 if U is not None else (None, None))
    return _merged((ei, ej, _exact_similarity(ei, ej, identical, U)), near, threshold, split, max_pairs, groups, identical, how)


def with_split(d: Duplicates, split: np.ndarray, U: np.ndarray | None = None) -> Duplicates:
    """The same findings judged against another split (a head's own split rule): the leaks,
    and each group of copies anchored on its first row in that split's train (``U``: the
    unit rows, for the cosine of copies whose embeddings differ)."""
    split = np.asarray(split)
    if d.groups is None:
        return Duplicates(d.pairs, d.exact, leak_mask(d.pairs.i, d.pairs.j, split), search=d.search)
    ei, ej = exact_pairs(d.groups, split)
    p, near = d.pairs, ~d.exact
    kept_near = Pairs(p.i[near], p.j[near], p.similarity[near], p.found - len(ei), p.threshold)  # a group of k copies is k - 1 pairs in any split
    return _merged((ei, ej, _exact_similarity(ei, ej, d.identical, U)), kept_near, p.threshold, split, len(p), d.groups, d.identical, d.search)
