"""Near-duplicates of large collections: the FAISS index against exact search, its measured
recall, and the sampled exact search (with its message) when FAISS is not installed."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.errors import UsageError
from pipeline.quality import duplicates
from pipeline.quality.ann import IndexShape, approximate_pairs_above, measured_recall
from pipeline.quality.options import AuditOptions
from pipeline.quality.similarity import pairs_above, unit_rows


def _rows_with_copies(n: int = 3000, d: int = 32, copies: int = 40, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Unit rows in general position plus ``copies`` slightly perturbed copies of random rows
    (cosine > 0.99 to their original; unrelated rows in 32 dims stay far below 0.9)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n - copies, copies, replace=False)
    X[n - copies :] = X[src] + 0.05 * rng.standard_normal((copies, d)).astype(np.float32)
    planted = {(int(a), int(b)) for a, b in zip(src, range(n - copies, n))}
    return unit_rows(X), planted


def test_the_index_finds_every_planted_copy_and_the_pairs_exact_search_finds():
    pytest.importorskip("faiss", reason="the ann extra is not installed")
    U, planted = _rows_with_copies()
    exact = pairs_above(U, 0.95, device="cpu")
    assert {(int(i), int(j)) for i, j in zip(exact.i, exact.j)} == planted  # the reference: exactly the planted pairs
    found = approximate_pairs_above(U, 0.95, shape=IndexShape.for_rows(len(U)))
    assert {(int(i), int(j)) for i, j in zip(found.i, found.j)} == planted
    np.testing.assert_allclose(np.sort(found.similarity), np.sort(exact.similarity), atol=1e-5)
    recall, pairs = measured_recall(U, 0.95, found, queries=len(U), device="cpu")
    assert (recall, pairs) == (1.0, len(planted))


def test_rows_on_disk_give_the_same_pairs_with_exact_similarities(tmp_path, monkeypatch):
    """The streamed audit's unit rows live in a spill: the index (8-bit codes) is filled and
    its cells kept on disk, and every candidate is re-scored from the rows themselves, so the
    similarities are the exact ones (not the codes'), and nothing is left in the folder; an
    index bounded in bytes (shards searched one after the other) finds the same pairs."""
    pytest.importorskip("faiss", reason="the ann extra is not installed")
    from pipeline.quality.spill import SpilledRows

    U, planted = _rows_with_copies(seed=3)
    disk = SpilledRows(len(U), U.shape[1], tmp_path / "cache.h5", "unit")
    disk.append(U)
    shape = IndexShape.for_rows(len(U))
    a, b = approximate_pairs_above(U, 0.95, shape=shape), approximate_pairs_above(disk, 0.95, shape=shape)
    from pipeline.quality import ann

    monkeypatch.setattr(ann, "QUERY_ROWS", 400)
    sharded = approximate_pairs_above(disk, 0.95, shape=shape, index_bytes=1)  # an index of 400 rows at a time: 8 shards
    assert {(int(i), int(j)) for i, j in zip(b.i, b.j)} == planted
    for field in ("i", "j", "similarity"):
        np.testing.assert_array_equal(getattr(b, field), getattr(a, field))
        np.testing.assert_array_equal(getattr(sharded, field), getattr(a, field))
    np.testing.assert_allclose(b.similarity, (U[b.i] * U[b.j]).sum(axis=1), rtol=0, atol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_measured_recall_counts_what_the_index_missed():
    """A search that lost half its pairs must not be reported as complete."""
    U, planted = _rows_with_copies()
    exact = pairs_above(U, 0.95, device="cpu")
    half = type(exact)(exact.i[::2], exact.j[::2], exact.similarity[::2], len(exact.i[::2]), 0.95)
    recall, pairs = measured_recall(U, 0.95, half, queries=len(U), device="cpu")
    assert pairs == len(planted) and recall == pytest.approx(len(half.i) / len(planted))


def _audit_rows(n: int = 600, seed: int = 1):
    from pipeline.quality import run_audit

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 64)).astype(np.float32) * 4
    labels = rng.integers(0, 3, n)
    X = centres[labels] + rng.standard_normal((n, 64)).astype(np.float32)
    X[-10:] = X[:10] + 0.01 * rng.standard_normal((10, 64)).astype(np.float32)  # 10 near copies
    labels[-10:] = labels[:10]
    split = np.where(np.arange(n) % 5 == 0, "val", "train").astype(object)
    paths = np.array([f"c{l}/{i}.png" for i, l in enumerate(labels)])
    return lambda **opts: run_audit(X, labels, split, paths, ["a", "b", "c"], AuditOptions(**opts))


def test_above_the_size_limit_the_audit_uses_the_index_and_prints_its_recall(monkeypatch):
    pytest.importorskip("faiss", reason="the ann extra is not installed")
    audit = _audit_rows()
    exact = audit(near_duplicates="exact")
    monkeypatch.setattr(duplicates, "ANN_MIN_ROWS", 100)
    approx = audit()
    assert approx.duplicates.search.method == "ann" and exact.duplicates.search.method == "exact"
    pairs = lambda a: {(int(i), int(j)) for i, j in zip(a.duplicates.pairs.i, a.duplicates.pairs.j)}  # noqa: E731
    assert pairs(approx) == pairs(exact) and len(pairs(exact)) >= 10
    assert approx.duplicates.search.recall == 1.0
    assert any("approximate index" in n and "recall 1.000" in n for n in approx.notes), approx.notes


def test_without_faiss_a_large_collection_is_searched_on_a_sample_and_says_so(monkeypatch):
    audit = _audit_rows()
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(duplicates, "ANN_MIN_ROWS", 100)
    sampled = audit()
    assert sampled.duplicates.search.method == "sample" and sampled.duplicates.search.rows == 100
    assert any("sample of 100 of 600 rows" in n and "featcache[ann]" in n for n in sampled.notes), sampled.notes
    with pytest.raises(UsageError, match=r"needs FAISS.*pip install 'featcache\[ann\]'"):
        audit(near_duplicates="ann")


def test_near_duplicates_option_is_checked():
    with pytest.raises(UsageError, match="--near-duplicates"):
        AuditOptions(near_duplicates="fast")
