"""Exact duplicates are exact (issue #28, item 5): rows with the same SHA-256, or with
byte-identical stored embeddings, are reported as duplicates (and leaks) whatever their
embeddings, the threshold or the whitening, one pair per copy against its group's first
training row; degenerate spaces (every row the same, fewer distinct rows than components, a
class of one row) are assessed without a crash or a NaN and say what they could not assess."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import audit_cache, write_report
from pipeline.heads import fit_head
from pipeline.quality import AuditOptions, embedding_map, fit_space, run_audit
from pipeline.quality.advice import advice
from pipeline.quality.audit import format_audit
from pipeline.store import CacheWriter, new_cache_meta


def _write_cache(path: Path, X: np.ndarray, labels: list[int], classes: list[str]) -> Path:
    """Imported rows (no file hash: SHA-256 all zeros), split by fit-head's hash rule."""
    meta = new_cache_meta("imported", X.shape[1], classes, weights="none", data_root="/nowhere")
    with CacheWriter.open(path, meta) as w:
        w.add_columns([f"{classes[y]}/{i}.jpg" for i, y in enumerate(labels)], X.astype(np.float32), labels=labels)
    return path


def _anchored_pairs(audit, rows: np.ndarray) -> set[tuple[int, int]]:
    """The pairs the rule gives for one group of copies: each against the group's first training row."""
    train = [int(r) for r in rows if audit.split[r] == "train"]
    anchor = train[0] if train else int(rows[0])
    return {(min(anchor, int(r)), max(anchor, int(r))) for r in rows if r != anchor}


def test_identical_imported_embeddings_are_exact_duplicates_and_leaks(tmp_path):
    """20 identical embeddings (imported: no hash) in 2 classes: the whitened space is empty (every
    centred row is zero), which used to report 0 pairs. Now: 19 exact pairs, the val copies as
    leaks, in the audit's JSON and text and in the report; label errors and the map say why not."""
    X = np.tile(np.random.default_rng(0).normal(size=16), (20, 1))
    cache = _write_cache(tmp_path / "same.h5", X, [i % 2 for i in range(20)], ["cat", "dog"])
    audit = audit_cache(cache)
    d = audit.duplicates
    assert len(d) == 19 and d.exact.all() and np.all(d.pairs.similarity == 1.0)
    assert set(zip(d.pairs.i.tolist(), d.pairs.j.tolist())) == _anchored_pairs(audit, np.arange(20))
    val = int((audit.split == "val").sum())
    assert val > 0 and audit.counts()["leaks"] == val and d.counts(audit.split)["val_copies_of_train"] == val

    out = audit.to_dict()
    json.dumps(out, allow_nan=False)  # no NaN anywhere
    assert out["counts"]["duplicates"] == 19 and all(e["exact"] for e in out["duplicates"]) and sum(e["leak"] for e in out["duplicates"]) == val
    assert out["near_duplicates_assessed"] is False and out["label_errors_assessed"] is False
    assert any("same vector" in n for n in out["notes"]) and "do not vary" in out["label_errors_skipped"]
    text = format_audit(audit, advice(audit))
    assert text.count(" exact") >= 19 and "LEAK" in text and "19 pair(s) of exact copies" in text

    from typer.testing import CliRunner

    from cli import app

    run = CliRunner().invoke(app, ["audit", str(cache), "--json", "--fail-on", "duplicates,leaks"])
    assert run.exit_code == 8, run.output  # found, so --fail-on fails the run
    assert json.loads(run.stdout.strip().splitlines()[-1])["counts"]["duplicates"] == 19

    head = fit_head(cache, "logreg", tmp_path / "same.head.pt", plots=False).head_path
    report = write_report(head, out=tmp_path / "same.html")
    assert report.counts["duplicates"] == 19 and report.counts["leaks"] == val
    assert Path(report.path).read_text().count('class="tag exact"') >= 1


def test_same_sha256_is_exact_whatever_the_embeddings_and_the_threshold():
    """Ten rows with one SHA-256 but unrelated embeddings, at a threshold (1.0) no pair reaches:
    9 exact pairs, each against the group's first training row, leaks where the split differs;
    rows without a hash (all zeros) are never paired by it."""
    rng = np.random.default_rng(1)
    n = 60
    X = rng.normal(size=(n, 32)).astype(np.float32)
    sha = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    sha[:10] = sha[0]
    sha[50:] = 0  # imported rows: no hash
    split = np.array(["val", "test", "val"] + ["train"] * 57, dtype=object)
    audit = run_audit(X, rng.integers(0, 2, n), split, np.array([f"{i}.png" for i in range(n)]), ["a", "b"],
                      AuditOptions(duplicate_threshold=1.0), sha256=sha)
    d = audit.duplicates
    assert set(zip(d.pairs.i.tolist(), d.pairs.j.tolist())) == {(3, r) if r > 3 else (r, 3) for r in range(10) if r != 3}
    assert d.exact.all() and np.all(d.pairs.similarity < 0.9)  # their cosine, not a made-up 1
    assert int(d.leak.sum()) == 3 and d.counts(split)["val_copies_of_train"] == 2 and d.counts(split)["test_copies_of_train"] == 1


def test_copies_judged_by_another_split_are_anchored_on_its_training_row():
    """A job audits a cache once and judges it by each head's split: the copies are re-anchored
    on the training row of that split, so every val / test copy of a training image is a leak."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 16)).astype(np.float32)
    X[1:4] = X[0]
    audit = run_audit(X, np.full(40, -1), np.array(["train", "val", "val", "val"] + ["train"] * 36, dtype=object),
                      np.array([f"{i}.png" for i in range(40)]), [])
    assert {(int(i), int(j)) for i, j, e in zip(audit.duplicates.pairs.i, audit.duplicates.pairs.j, audit.duplicates.exact) if e} == {(0, 1), (0, 2), (0, 3)}
    head_split = np.array(["val", "train", "val", "test"] + ["train"] * 36, dtype=object)
    judged = audit.judged_by(head_split)
    d = judged.duplicates
    assert {(int(i), int(j)) for i, j, e in zip(d.pairs.i, d.pairs.j, d.exact) if e} == {(0, 1), (1, 2), (1, 3)} and d.leak[d.exact].all()
    counts = d.counts(head_split)
    assert counts["val_copies_of_train"] == 2 and counts["test_copies_of_train"] == 1 and counts["pairs"] == len(audit.duplicates)
    assert counts["pairs_found"] == audit.duplicates.pairs.found


def test_many_copies_give_one_pair_each_and_leave_room_for_near_duplicates():
    """3,000 copies of one row are 2,999 pairs (not 4.5 million cut to --max-pairs), and the
    near-duplicate search still finds the planted near-copy among the other rows."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3200, 24)).astype(np.float32)
    X[:3000] = X[0]
    X[3199] = X[3100] + rng.normal(0, 1e-3, 24)
    audit = run_audit(X, np.full(3200, -1), np.array(["train"] * 3200, dtype=object), np.array([f"{i}.png" for i in range(3200)]), [],
                      AuditOptions(max_pairs=5000))
    d = audit.duplicates
    assert int(d.exact.sum()) == 2999 and d.pairs.found < 5000 and not d.pairs.truncated
    assert set(d.pairs.i[d.exact].tolist()) == {0}
    assert (3100, 3199) in set(zip(d.pairs.i[~d.exact].tolist(), d.pairs.j[~d.exact].tolist()))


def test_identical_black_pngs_are_exact_duplicates(tmp_path, tiny_hub):
    """The issue's case: 10 byte-identical all-black PNGs through extract (same SHA-256) used to give 0 pairs."""
    from pipeline.extract import run_extract

    root = tmp_path / "black"
    (root / "a").mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (32, 32)).save(root / "a" / f"{i}.png")
    run_extract(root, tiny_hub, "none", tmp_path / "black.h5", batch_size=64, workers=0)
    audit = audit_cache(tmp_path / "black.h5")
    assert len(audit.duplicates) == 9 and audit.duplicates.exact.all() and audit.counts()["leaks"] == int((audit.split == "val").sum())


def test_degenerate_spaces_say_what_they_cannot_assess_without_nan():
    rng = np.random.default_rng(3)
    same = np.tile(rng.normal(size=8), (20, 1)).astype(np.float32)
    assert fit_space(same).dims == 0  # no direction to whiten (it used to keep one of variance 0)

    three = np.repeat(rng.normal(size=(3, 64)) * 3 + 5, 10, axis=0).astype(np.float32)  # 3 distinct rows: 2 directions, not 7
    space = fit_space(three)
    assert space.dims == 2 and np.isfinite(space.project(three)).all()
    audit = run_audit(three, np.arange(30) % 2, np.array(["train", "val"] * 15, dtype=object), np.array([f"{i}.png" for i in range(30)]), ["a", "b"])
    assert np.isfinite(audit.whitened).all() and int(audit.duplicates.exact.sum()) == 27
    json.dumps(audit.to_dict(), allow_nan=False)

    two = np.repeat(rng.normal(size=(2, 16)), 10, axis=0).astype(np.float32)  # one direction: the map still has two axes
    audit = run_audit(two, np.full(20, -1), np.array([""] * 20, dtype=object), np.array([f"{i}.png" for i in range(20)]), [])
    emap = embedding_map(audit.space, audit.whitened, "pca")
    assert audit.space.dims == 1 and emap.xy.shape == (20, 2) and np.isfinite(emap.xy).all() and "one direction" in emap.note


@pytest.mark.parametrize("labels", [[0] * 19 + [1], [0, 1, 2]], ids=["class-of-one", "one-row-per-class"])
def test_label_errors_with_classes_of_one_row_do_not_crash(labels):
    """A class of one row has a fold whose training rows hold one class (the fast logreg refused
    it); no class of two rows allows no folds (StratifiedKFold refused it). Both crashed the audit."""
    n = len(labels)
    X = np.random.default_rng(4).normal(size=(n, 8)).astype(np.float32)
    audit = run_audit(X, np.array(labels), np.array(["train"] * n, dtype=object), np.array([f"{i}.png" for i in range(n)]), ["a", "b", "c"])
    if max(np.bincount(labels)) < 2:
        assert audit.oof is None and "at least 2 labelled rows" in audit.label_errors_skipped
    else:
        assert audit.oof is not None and np.isfinite(audit.oof.proba).all()


def test_first_of_equal_matches_a_plain_dictionary():
    """The grouping under every exact-copy check, against the obvious loop: each row whose value
    another row shares points at the smallest such row, the others at -1 (values on a subset of rows too)."""
    from pipeline.quality.duplicates import _first_of_equal

    rng = np.random.default_rng(0)
    for n, distinct in ((1, 1), (2, 1), (50, 5), (1000, 900), (1000, 1000)):
        rows = np.sort(rng.choice(3 * n, n, replace=False))
        values = rng.integers(0, distinct, n).astype(np.uint64)
        first: dict[int, int] = {}
        count: dict[int, int] = {}
        for r, v in zip(rows.tolist(), values.tolist()):
            first.setdefault(v, r)
            count[v] = count.get(v, 0) + 1
        want = np.full(3 * n, -1)
        for r, v in zip(rows.tolist(), values.tolist()):
            if count[v] > 1:
                want[r] = first[v]
        np.testing.assert_array_equal(_first_of_equal(values, rows, 3 * n), want)
