"""The audit of a cache over --memory-budget (#32 item 3): the embeddings read a chunk at a
time, the projected rows spilled to an unlinked file beside the cache; on a cache that also
fits in memory, the same findings as the in-memory audit."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline import audit_cache, load_cache
from pipeline.quality import AuditOptions
from pipeline.quality.spill import CacheRows, SpilledRows, Subset
from pipeline.store import CacheWriter, new_cache_meta, read_rows


@pytest.fixture(scope="module")
def noisy_copied_digits(digits_cache, tmp_path_factory) -> Path:
    """The digits with 5 % of the labels flipped, 20 near-copies (the row plus a little noise)
    and 10 exact copies of existing rows: every check has something to find."""
    data = load_cache(digits_cache)
    rng = np.random.default_rng(1)
    X, labels = data.embeddings.astype(np.float32), data.labels.copy()
    flip = rng.choice(len(labels), 90, replace=False)
    labels[flip] = (labels[flip] + rng.integers(1, 10, len(flip))) % 10
    near, exact = rng.choice(len(labels), 20, replace=False), rng.choice(len(labels), 10, replace=False)
    scale = X.std(axis=0).mean() * 1e-3
    X = np.concatenate([X, X[near] + rng.normal(0, scale, (20, X.shape[1])).astype(np.float32), X[exact]])
    labels = np.concatenate([labels, labels[near], labels[exact]])
    path = tmp_path_factory.mktemp("streamed") / "noisy.h5"
    meta = new_cache_meta("imported", X.shape[1], list(data.classes), weights="none", data_root="/nowhere")
    with CacheWriter.open(path, meta) as w:
        w.add_columns([f"{data.classes[y]}/{i:05d}.png" for i, y in enumerate(labels)], X, labels=labels.tolist())
    return path


def strip(d):
    """``d`` without its timings, at any depth."""
    return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "seconds"}


def test_streamed_audit_equals_the_in_memory_audit(noisy_copied_digits, said):
    folder = noisy_copied_digits.parent
    before = sorted(os.listdir(folder))
    memory = audit_cache(noisy_copied_digits, AuditOptions(memory_budget="8GiB"))
    disk = audit_cache(noisy_copied_digits, AuditOptions(memory_budget="64KiB"))
    assert isinstance(memory.whitened, np.ndarray) and isinstance(disk.whitened, SpilledRows) and isinstance(disk.unit, SpilledRows)
    assert any("over --memory-budget 64.0 KiB" in m and m.startswith("audit:") for m in said)
    np.testing.assert_array_equal(disk.space.components, memory.space.components)
    np.testing.assert_array_equal(disk.whitened[:], memory.whitened)
    np.testing.assert_array_equal(disk.oof.proba, memory.oof.proba)
    assert len(memory.label_error_rows()) >= 50  # the flips are found, and the same ones
    np.testing.assert_array_equal(disk.label_error_rows(), memory.label_error_rows())
    np.testing.assert_array_equal(disk.hardest_rows(), memory.hardest_rows())
    assert strip(disk.estimate.to_dict()) == strip(memory.estimate.to_dict())
    a, b = memory.duplicates, disk.duplicates
    assert a.counts(memory.split)["exact_pairs"] >= 10 and (~a.exact).sum() >= 20  # the planted copies
    for field in ("i", "j", "similarity"):
        np.testing.assert_array_equal(getattr(b.pairs, field), getattr(a.pairs, field))
    assert strip(disk.to_dict()) == strip(memory.to_dict())
    del disk
    assert sorted(os.listdir(folder)) == before  # the spill had no name: nothing left beside the cache


def test_rows_on_disk_index_like_arrays(noisy_copied_digits, tmp_path):
    """Slices, single rows, fancy and boolean indices, columns: the same values as the array."""
    X = load_cache(noisy_copied_digits).embeddings
    with read_rows(noisy_copied_digits) as table:
        lazy = CacheRows(table)
        rng = np.random.default_rng(0)
        idx = rng.choice(len(X), 300, replace=True)
        for key in (slice(10, 200), slice(None, None, 7), 5, -1, idx, np.sort(idx), X[:, 0] > 0, (idx, slice(0, 3))):
            np.testing.assert_array_equal(lazy[key], X[key])
    spill = SpilledRows(len(X), X.shape[1], tmp_path / "x.h5")
    for a in range(0, len(X), 500):
        spill.append(X[a : a + 500])
    far = np.array([0, 1, 2, 900, 901, 1800, len(X) - 1])
    for key in (slice(3, 1000), 17, idx, far, (far, slice(0, 2))):
        np.testing.assert_array_equal(spill[key], X[key])
    sub = Subset(spill, far)
    np.testing.assert_array_equal(sub[1:5], X[far[1:5]])
    np.testing.assert_array_equal(sub[np.array([6, 0])], X[far[[6, 0]]])
    with pytest.raises(ValueError):
        spill.append(X[:1])  # full
    assert os.listdir(tmp_path) == []


def test_report_over_the_budget_shows_what_the_in_memory_report_shows(noisy_copied_digits, tmp_path):
    """The report streams too (scores a chunk at a time, keeps only the mistakes'
    probabilities, audits from disk): the same counts, mistakes, neighbours and advice."""
    from pipeline import write_report
    from pipeline.heads import fit_head
    from pipeline.quality import ReportOptions

    head = fit_head(noisy_copied_digits, "logreg", tmp_path / "h.pt", C=0.01, plots=False).head_path
    memory = write_report(head, out=tmp_path / "memory.html", options=ReportOptions(memory_budget="8GiB")).to_dict()
    disk = write_report(head, out=tmp_path / "disk.html", options=ReportOptions(memory_budget="64KiB")).to_dict()
    assert memory["mistakes"] > 10 and memory["counts"]["label-errors"] > 0 and memory["counts"]["duplicates"] >= 30
    for key in ("counts", "advice", "metrics", "mistakes", "notes", "findings"):
        assert disk[key] == memory[key], key
    section = lambda html, name: html[html.index(f'id="{name}"') :].split("<section", 1)[0]  # noqa: E731
    pages = [(tmp_path / f"{k}.html").read_text() for k in ("memory", "disk")]
    for name in ("mistakes", "label-errors", "duplicates"):
        assert section(pages[0], name) == section(pages[1], name), name


def test_a_full_disk_while_spilling_is_one_clear_error(noisy_copied_digits, monkeypatch, tmp_path):
    """ENOSPC in the middle of the spill (after the free-space check passed): a StorageError
    naming the folder and the fix, the cache untouched, no file left beside it."""
    import errno

    from pipeline.errors import StorageError

    folder = noisy_copied_digits.parent
    before = sorted(os.listdir(folder))
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(StorageError, match="the disk is full"):
        audit_cache(noisy_copied_digits, AuditOptions(memory_budget="64KiB"))
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == before
    assert len(load_cache(noisy_copied_digits).labels) == 1827


@pytest.mark.parametrize("text", ["0", "abc", "-1GiB", "1e400", "5 parsecs"])
def test_bad_memory_budgets_are_one_line_usage_errors(text, tmp_path):
    from conftest import run_cli

    r = run_cli("audit", str(tmp_path / "none.h5"), "--memory-budget", text)
    assert r.returncode == 2 and "--memory-budget" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("method", ["prune_by_class", "prune_by_noise_rate"])
def test_out_of_fold_probabilities_spilled_to_disk(noisy_copied_digits, monkeypatch, method):
    """Past a quarter of the budget the [N, K] out-of-fold probabilities go to an unlinked
    float32 file (10 M x 100 classes: 4 GB never held), and confident learning reads them a
    chunk (or one class's rows) at a time: the same label errors as in memory."""
    import pipeline.quality.audit as audit_module

    memory = audit_cache(noisy_copied_digits, AuditOptions(memory_budget="8GiB", label_method=method))
    monkeypatch.setattr(audit_module, "PROBA_FLOAT64_FLOOR", 0)
    disk = audit_cache(noisy_copied_digits, AuditOptions(memory_budget="64KiB", label_method=method))
    assert isinstance(disk.oof.proba, SpilledRows) and isinstance(memory.oof.proba, np.ndarray)
    np.testing.assert_allclose(disk.oof.proba[:], memory.oof.proba, rtol=1e-5, atol=1e-7)
    assert disk.oof.accuracy == memory.oof.accuracy
    assert len(memory.issues) >= 40
    np.testing.assert_array_equal(disk.issues.mask, memory.issues.mask)
    np.testing.assert_array_equal(disk.issues.ranked, memory.issues.ranked)
    np.testing.assert_array_equal(disk.issues.confident_joint, memory.issues.confident_joint)
    np.testing.assert_array_equal(disk.label_error_rows(), memory.label_error_rows())
    assert strip(disk.to_dict()) == strip(memory.to_dict())
