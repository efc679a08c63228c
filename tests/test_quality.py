"""Data quality on cached embeddings, against independent references: cleanlab on the same
out-of-fold probabilities, brute-force numpy cosine search, scikit-learn's PCA, and labels
flipped on purpose in the real digits (random-init resnet18 features, as the demo uses)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.errors import UsageError
from pipeline.quality import AuditOptions, embedding_map, find_label_issues, pairs_above, parse_fail_on, run_audit, top_k, unit_rows

FLIP_RATE = 0.05


@pytest.fixture(scope="module")
def flipped_digits(digits_cache):
    """The 1,797 digits with 5 % of the labels moved to another class (seeded), audited."""
    data = load_cache(digits_cache)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(data.labels), int(round(FLIP_RATE * len(data.labels))), replace=False)
    noisy = data.labels.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, len(flipped))) % 10
    split = np.array(["train"] * len(noisy), dtype=object)
    audit = run_audit(data.embeddings, noisy, split, data.paths, data.classes, AuditOptions(), sha256=data.fingerprints["sha256"])
    return data, noisy, flipped, audit


def test_flipped_labels_are_found(flipped_digits):
    _, _, flipped, audit = flipped_digits
    found = set(audit.label_error_rows().tolist())
    hits = len(found & set(flipped.tolist()))
    precision, recall = hits / len(found), hits / len(flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall, len(found), len(flipped))  # measured: 0.87 / 0.87 (90 flipped)
    ranked = audit.label_error_rows()
    conf = audit.issues.self_confidence[np.searchsorted(audit.labelled, ranked)]
    assert np.all(np.diff(conf) >= 0)  # worst (lowest probability of the given label) first


@pytest.mark.parametrize("method", ["prune_by_class", "prune_by_noise_rate"])
def test_label_issues_equal_cleanlab_on_the_same_probabilities(flipped_digits, method):
    cleanlab_filter = pytest.importorskip("cleanlab.filter", reason="cleanlab is not installed (pip install -e '.[test]' brings it)")
    _, noisy, _, audit = flipped_digits
    proba = audit.oof.proba
    ours = find_label_issues(noisy, proba, method).mask
    theirs = cleanlab_filter.find_label_issues(noisy, proba, filter_by=method, n_jobs=1)
    assert ours.sum() > 50 and np.array_equal(ours, theirs)
    ranked = cleanlab_filter.find_label_issues(noisy, proba, filter_by=method, n_jobs=1, return_indices_ranked_by="self_confidence")
    assert np.array_equal(find_label_issues(noisy, proba, method).ranked, ranked)


def test_clean_digits_have_no_duplicates_at_the_default_threshold(flipped_digits):
    _, _, _, audit = flipped_digits
    assert len(audit.duplicates) == 0 and audit.counts()["duplicates"] == 0


def test_pca_map_equals_scikit_learn(flipped_digits):
    from sklearn.decomposition import PCA

    data, _, _, audit = flipped_digits
    emap = embedding_map(audit.space, audit.whitened, "pca")
    reference = PCA(2, svd_solver="full").fit_transform(data.embeddings.astype(np.float64))
    signs = np.sign((emap.xy * reference).sum(axis=0))  # a component's sign is arbitrary
    scale = np.abs(reference).max()
    assert np.abs(emap.xy * signs - reference).max() < 1e-3 * scale and len(emap.rows) == len(data.embeddings)


def test_blocked_search_equals_brute_force():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    X[200:230] = X[:30] + rng.normal(0, 0.05, (30, 16))  # planted near-copies
    X[250] = X[5]  # and an exact one
    U = unit_rows(X)
    S = U.astype(np.float64) @ U.T.astype(np.float64)
    i, j = np.nonzero(np.triu(S >= 0.95, 1))
    pairs = pairs_above(U, 0.95, block_rows=7, block_cols=13, device="cpu")  # blocks that do not divide N: every edge case
    assert set(zip(pairs.i.tolist(), pairs.j.tolist())) == set(zip(i.tolist(), j.tolist())) and len(pairs) >= 31
    assert np.allclose(pairs.similarity, S[pairs.i, pairs.j], atol=1e-5) and np.all(np.diff(pairs.similarity) <= 1e-7)
    top = pairs_above(U, 0.95, max_pairs=5, block_rows=7, block_cols=13, device="cpu")  # bounded: the 5 most similar, and how many there were
    assert len(top) == 5 and top.found == len(i) and top.truncated and np.allclose(top.similarity, np.sort(S[i, j])[::-1][:5], atol=1e-5)
    idx, sims = top_k(U[:10], U, 3, device="cpu", exclude=np.arange(10), block_cols=17)
    masked = S[:10].copy()
    masked[np.arange(10), np.arange(10)] = -np.inf
    assert np.array_equal(idx, np.argsort(-masked, axis=1, kind="stable")[:, :3]) and np.allclose(sims, np.sort(masked, axis=1)[:, ::-1][:, :3], atol=1e-5)


def test_fail_on_names_checks_and_refuses_others():
    assert parse_fail_on("leaks,Duplicates") == ("leaks", "duplicates") and parse_fail_on(None) == ()
    assert len(parse_fail_on("all")) == 5
    with pytest.raises(UsageError, match="--fail-on 'leak'"):
        parse_fail_on("leak")
    with pytest.raises(UsageError, match="--folds must be at least 2"):
        AuditOptions(folds=1)


def test_label_errors_are_not_guessed_when_the_model_is_at_chance():
    """Random embeddings with random labels: confident learning on chance-level probabilities
    flags a large share of the rows; the audit says it cannot judge instead (and the digits above,
    out-of-fold accuracy far above chance, are judged)."""
    from pipeline.quality.advice import advice
    from pipeline.quality.audit import format_audit

    rng = np.random.default_rng(1)
    X, labels = rng.normal(size=(300, 16)).astype(np.float32), rng.integers(0, 3, 300)
    paths = np.array([f"c{y}/{i}.png" for i, y in enumerate(labels)])
    audit = run_audit(X, labels, np.array(["train"] * 300, dtype=object), paths, ["a", "b", "c"])
    assert not audit.oof.informative and audit.oof.chance == np.bincount(labels).max() / 300
    assert len(find_label_issues(labels, audit.oof.proba)) > 30  # what would have been reported
    assert audit.issues is None and audit.counts()["label-errors"] == 0 and audit.failing(("label-errors",)) == []
    assert audit.to_dict()["label_errors_assessed"] is False
    assert "not assessed" in format_audit(audit, advice(audit)) and any("not assessed" in a for a in advice(audit))


def test_audit_text_keeps_one_line_per_path():
    from pipeline.quality.audit import format_audit

    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 8)).astype(np.float32)
    X[1] = X[0]
    paths = np.array(["a/new\nline.png", "b/copy.png", "a/2.png", "b/3.png", "a/4.png", "b/5.png"])
    audit = run_audit(X, np.array([0, 1, 0, 1, 0, 1]), np.array(["val", "train"] * 3, dtype=object), paths, ["a", "b"])
    text = format_audit(audit, [])
    assert "a/new\\nline.png (val) ~ b/copy.png (train)" in text


def test_the_duplicate_threshold_rises_in_small_spaces():
    """``chance_threshold`` against closed forms: on the 2-sphere the cosine of two random
    directions is uniform on [-1, 1] (Archimedes), on the circle the angle is uniform; and a
    9-row collection (2 components) of unrelated rows reports no pairs, where 0.96 found some."""
    from pipeline.quality.duplicates import chance_threshold

    assert chance_threshold(3, 2, alpha=0.01) == pytest.approx(0.98, abs=1e-9)  # (1 - t) / 2 = 0.01
    assert chance_threshold(2, 2, alpha=0.1) == pytest.approx(np.cos(0.1 * np.pi), abs=1e-9)  # acos(t) / pi = 0.1
    assert chance_threshold(128, 50_000) < 0.96  # large collections keep the user's threshold
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 32)).astype(np.float32)
    audit = run_audit(X, np.full(9, -1), np.array([""] * 9, dtype=object), np.array([f"{i}.png" for i in range(9)]), [])
    assert audit.space.dims == 2 and audit.duplicate_threshold > 0.96 and len(audit.duplicates) == 0
    assert len(pairs_above(audit.unit, 0.96)) > 0  # what the fixed threshold would have reported
