"""User data that used to end in an internal error (issue #28, item 8): a class folder whose
name matplotlib would parse as TeX, one image per class, identical embeddings, a class that only
val holds. Each either fits what can be fitted or is refused in one line naming the cache and
the fix (exit 2); every figure draws names and titles as written."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from pipeline import write_report
from pipeline.errors import ExitCode, UsageError
from pipeline.heads import LinearHead, assign_splits, fit_head, full_proba, load_head
from pipeline.heads.metrics import confusion_figure, leaderboard_figure, save_figure
from pipeline.predict import plot_grid
from pipeline.report.figures import map_uri
from pipeline.store import CacheWriter, new_cache_meta

from conftest import make_image

HEADS = ["logreg", "linear", "mlp", "knn"]
TEX = "$\\frac{a$"  # a folder name mathtext cannot parse


def _write_cache(path: Path, X: np.ndarray, labels: list[int], classes: list[str], paths: list[str] | None = None,
                 split: list[str] | None = None) -> Path:
    meta = new_cache_meta("imported", X.shape[1], classes, weights="none", data_root="/nowhere")
    with CacheWriter.open(path, meta) as w:
        w.add_columns(paths or [f"{classes[y]}/{i}.jpg" for i, y in enumerate(labels)], X.astype(np.float32), labels=labels,
                      **({"split": split} if split else {}))
    return path


def _path_sent_to(side: str, folder: str) -> str:
    """A file name that fit-head's default hash split (val fraction 0.2, seed 0) puts on ``side``."""
    names = [f"{folder}/{i}.png" for i in range(200)]
    split, _ = assign_splits(names, np.zeros(len(names), dtype=int), [""] * len(names))
    return names[int(np.flatnonzero(split == side)[0])]


@pytest.mark.parametrize("clf", HEADS)
def test_one_image_per_class_is_refused_in_one_line_and_fits_without_val(tmp_path, clf):
    """The split sends class a's only image to val, leaving train one class: logreg raised an
    internal ValueError, the torch heads and knn fitted a head that knows one class. Now a
    one-line UsageError naming the cache and the fix; with the fix (--val-fraction 0) it fits."""
    X = np.random.default_rng(0).normal(size=(2, 8))
    cache = _write_cache(tmp_path / "one.h5", X, [0, 1], ["a", "b"], [_path_sent_to("val", "a"), _path_sent_to("train", "b")])
    head = tmp_path / f"one.{clf}.head.pt"
    with pytest.raises(UsageError) as err:
        fit_head(cache, clf, head, plots=False)
    message = str(err.value)
    assert "\n" not in message and "one.h5" in message and "only class 'b'" in message and "--val-fraction 0" in message
    assert err.value.exit_code == ExitCode.USAGE and not head.exists()

    result = fit_head(cache, clf, head, plots=False, val_fraction=0.0)
    proba = full_proba(load_head(result.head_path).head, X, 2)
    assert result.n_train == 2 and np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1)


@pytest.mark.parametrize("clf", HEADS)
def test_identical_embeddings_fit_or_are_refused_in_one_line(tmp_path, clf):
    """20 identical embeddings in 2 classes. Pre-split with train holding only cat: the torch heads
    crashed with IndexError (a val label beyond their outputs); now refused, naming train/. With
    both classes in train every head fits, and scores the class prior (nothing else to go on)."""
    X = np.tile(np.random.default_rng(1).normal(size=8), (20, 1))
    labels = [0] * 10 + [1] * 10
    presplit = _write_cache(tmp_path / "presplit.h5", X, labels, ["cat", "dog"], split=["train"] * 10 + ["val"] * 10)
    with pytest.raises(UsageError, match=r"presplit\.h5.*only class 'cat'.*put images of 'dog' in train/"):
        fit_head(presplit, clf, tmp_path / "p.head.pt", plots=False)

    mixed = _write_cache(tmp_path / "mixed.h5", X, [i % 2 for i in range(20)], ["cat", "dog"])
    result = fit_head(mixed, clf, tmp_path / "m.head.pt", plots=True)
    assert np.isfinite(result.metrics["val"]["log_loss"]) and Path(result.reports["confusion_val_png"]).exists()


@pytest.mark.parametrize("clf,params", [("linear", {}), ("mlp", {}), ("linear", {"stream": True}), ("linear", {"lr": (1e-3, 1e-2)}),
                                        ("knn", {"k": (1, 3)})], ids=["linear", "mlp", "linear-streamed", "linear-grid", "knn-k"])
def test_a_class_only_val_holds_is_warned_and_scored_as_mistakes(tmp_path, caplog, clf, params):
    """Train holds a and b, val also c: the torch heads crashed on c's label while early stopping.
    Now the head learns a and b, says c cannot be predicted, and c's val rows count as mistakes."""
    rng = np.random.default_rng(2)
    labels = [0, 1] * 10 + [0, 1, 2] * 4
    X = rng.normal(size=(len(labels), 8)) + 4 * np.eye(8)[labels]  # a direction per class (cosine and euclidean heads alike)
    cache = _write_cache(tmp_path / "three.h5", X, labels, ["a", "b", "c"], split=["train"] * 20 + ["val"] * 12)
    with caplog.at_level(logging.WARNING):
        result = fit_head(cache, clf, tmp_path / "h.pt", plots=False, **params)
    assert any("'c'" in r.getMessage() and "no training rows" in r.getMessage() for r in caplog.records)
    val = result.metrics["val"]
    assert val["n"] == 12 and val["per_class"]["c"]["support"] == 4 and val["per_class"]["c"]["recall"] == 0.0
    assert list(load_head(result.head_path).head.classes_) == [0, 1]


def test_torch_head_scores_early_stopping_on_known_classes_only():
    """The estimator alone (library use): validation rows of a class it never trained on are left
    out of early stopping, as LogRegHead and KNNHead already do, instead of an IndexError."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 2
    head = LinearHead(epochs=2).fit(X, y, X[:6], np.array([0, 1, 2, 0, 1, 2]))
    assert list(head.classes_) == [0, 1] and len(head.history_) == 2 and np.isfinite(head.history_[0]["val_loss"])


def test_class_names_and_titles_are_drawn_as_written(tmp_path):
    """A class folder named $\\frac{a$ crashed mathtext in fit-head's confusion plot (after the
    head was written) and in the report. Every figure now shows it literally, and the user's own
    matplotlib settings are left as they were."""
    X = np.random.default_rng(4).normal(size=(16, 8)) + 4 * (np.arange(16) % 2)[:, None]
    cache = _write_cache(tmp_path / "tex.h5", X, [i % 2 for i in range(16)], [TEX, "b"], split=["train"] * 10 + ["val"] * 6)
    result = fit_head(cache, "linear", tmp_path / "tex.head.pt", plots=True, title="$x")
    assert Path(result.reports["confusion_val_png"]).stat().st_size > 0 and Path(result.reports["history_png"]).exists()
    assert Path(write_report(result.head_path, out=tmp_path / "tex.html").path).exists()

    fig = confusion_figure([[1, 0], [0, 1]], [TEX, "b"], f"{TEX} confusion")
    fig.canvas.draw()
    assert fig.axes[0].get_xticklabels()[0].get_text() == TEX and not fig.axes[0].get_xticklabels()[0].get_parse_math()
    save_figure(fig, tmp_path / "confusion.png")
    save_figure(leaderboard_figure([{"name": TEX, "accuracy": 0.5}], f"{TEX} by head"), tmp_path / "board.png")
    assert map_uri(np.zeros((4, 2)), np.array([0, 1, 0, 1]), [TEX, "b"], np.array([0]), np.array([1]), TEX).startswith("data:image/png")
    image = make_image(tmp_path / f"{TEX}.png")
    plot_grid([{"path": str(image), "predicted": TEX, "probability": 0.9, "true": "b"}], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert matplotlib.rcParams["text.parse_math"] is True
