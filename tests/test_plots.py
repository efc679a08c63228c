"""The report pictures (issue #15): a 1-epoch history is drawn (markers, epoch 0, the kept epoch,
the same colours in both panels), leaderboard bars carry their values, titles fit and name the head."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from pipeline.heads import metrics
from pipeline.heads.metrics import (
    KEPT_COLOR,
    TRAIN_COLOR,
    VAL_COLOR,
    confusion_figure,
    history_figure,
    kept_epoch,
    leaderboard_figure,
    plot_history,
    save_figure,
)

ONE_EPOCH = [{"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.55, "val_loss": 0.9, "val_accuracy": 0.7}]
FINETUNE_ONE_EPOCH = [{"epoch": 0, "val_loss": 2.3, "val_accuracy": 0.1}, *ONE_EPOCH]  # epoch 0: the assembled model
LONG_TITLE = "mlp-wide (mlp) on clip-vit-base-patch32 laion2b_s34b_b79k, a rather long descriptive name: val confusion"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def _has_colour(img: np.ndarray, colour: str, tol: int = 40, min_pixels: int = 3) -> bool:
    target = np.array([round(255 * c) for c in to_rgb(colour)])
    return int((np.abs(img - target).sum(axis=2) <= tol).sum()) >= min_pixels


def _colour_at(img: np.ndarray, ax, x: float, y: float, colour: str, radius: int = 4) -> bool:
    """Whether ``colour`` is drawn within ``radius`` pixels of data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    row, col = img.shape[0] - round(py), round(px)
    window = img[max(row - radius, 0) : row + radius + 1, max(col - radius, 0) : col + radius + 1]
    return _has_colour(window, colour, min_pixels=2)


def _saved(fig, tmp_path: Path, name: str) -> np.ndarray:
    """Save as the reports do (layout, 100 dpi); the figure's transforms then match the PNG's pixels."""
    return _pixels(save_figure(fig, tmp_path / name))


def _inside_figure(fig, *artists) -> None:
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    for a in artists:
        box = a.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (a.get_text(), box, (width, height))


def test_a_one_epoch_history_draws_train_val_and_the_kept_epoch(tmp_path):
    fig = history_figure(ONE_EPOCH, "mlp: training history", best_epoch=1)
    loss_ax, acc_ax = fig.axes
    img = _saved(fig, tmp_path, "h.png")
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):  # a marker on the single point, train and val, in both panels
        assert _colour_at(img, ax, 1, ONE_EPOCH[0][f"train_{what}"], TRAIN_COLOR), what
        assert _colour_at(img, ax, 1, ONE_EPOCH[0][f"val_{what}"], VAL_COLOR), what
        assert _colour_at(img, ax, 1, ONE_EPOCH[0][f"val_{what}"], KEPT_COLOR), what  # the star on the kept val point
        lo, hi = ax.get_xlim()
        assert lo <= 0.5 and hi >= 1.5  # a sensible range around one point, not 0.96..1.04
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1]  # integer ticks only
        assert "kept: epoch 1" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert _has_colour(img, TRAIN_COLOR) and _has_colour(img, VAL_COLOR) and _has_colour(img, KEPT_COLOR)


def test_the_colours_are_the_same_in_both_panels(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.5 / e, "val_accuracy": 0.4 + 0.1 * e} for e in (1, 2, 3)]
    fig = history_figure(history, "linear: training history", best_epoch=3)
    lines = {ax.get_ylabel(): {ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in fig.axes}
    assert lines["loss"]["train"] == lines["accuracy"]["train"] == TRAIN_COLOR
    assert lines["loss"]["val"] == lines["accuracy"]["val"] == VAL_COLOR
    img = _saved(fig, tmp_path, "h.png")
    acc_ax = fig.axes[1]
    assert _colour_at(img, acc_ax, 2, history[1]["train_accuracy"], TRAIN_COLOR)
    assert _colour_at(img, acc_ax, 2, history[1]["val_accuracy"], VAL_COLOR)


def test_a_finetune_history_draws_epoch_0(tmp_path):
    fig = history_figure(FINETUNE_ONE_EPOCH, "finetune tinybn: training history", best_epoch=1)
    loss_ax, acc_ax = fig.axes
    img = _saved(fig, tmp_path, "ft.png")
    assert _colour_at(img, loss_ax, 0, 2.3, VAL_COLOR) and _colour_at(img, acc_ax, 0, 0.1, VAL_COLOR)
    assert _colour_at(img, loss_ax, 1, 0.9, KEPT_COLOR)
    lo, hi = loss_ax.get_xlim()
    assert lo < 0 and hi > 1 and [t for t in loss_ax.get_xticks() if lo <= t <= hi] == [0, 1]


def test_plot_history_writes_a_png_that_is_not_blank(tmp_path):
    path = plot_history(FINETUNE_ONE_EPOCH, tmp_path / "h.png", "finetune: training history", best_epoch=0)
    img = _pixels(path)
    assert _has_colour(img, TRAIN_COLOR) and _has_colour(img, VAL_COLOR) and _has_colour(img, KEPT_COLOR)


def test_kept_epoch_follows_the_heads_rule():
    rows = [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 0.5}, {"epoch": 3, "val_loss": 0.5 - 1e-8}, {"epoch": 4, "val_loss": 0.7}]
    assert kept_epoch(rows) == 2  # an improvement under 1e-6 does not count (TorchHead.fit_source, the grid)
    assert kept_epoch([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]) == 2  # no validation: the last epoch
    assert kept_epoch([]) is None


def test_leaderboard_bars_carry_their_values_and_a_tie_shows(tmp_path):
    rows = [{"name": "mlp lr=0.001 wd=0.0001 hidden=512,256", "accuracy": 0.9812}, {"name": "mlp lr=0.003", "accuracy": 0.9812},
            {"name": "linear", "accuracy": 0.5}]
    fig = leaderboard_figure(rows, "mlp-wide (mlp): 3 heads trained in one read (best first), validation accuracy of each")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == ["0.5000", "0.9812", "0.9812"]
    renderer = fig.canvas.get_renderer()
    for t in ax.texts:  # each label right of its bar, inside the axes (the x-limits leave room)
        box = t.get_window_extent(renderer)
        assert ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1, t.get_text()
    _inside_figure(fig, ax.title, *ax.get_yticklabels())
    save_figure(fig, tmp_path / "board.png")


def test_a_long_confusion_title_and_long_class_names_fit():
    names = ["a_class_name_that_goes_on_and_on_for_a_while", "b", "c"]
    fig = confusion_figure([[3, 1, 0], [0, 4, 0], [1, 0, 5]], names, LONG_TITLE)
    ax = fig.axes[0]
    assert " ".join(ax.get_title().split()) == LONG_TITLE  # wrapped, not cut
    _inside_figure(fig, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels())


def test_a_long_history_title_fits():
    fig = history_figure(ONE_EPOCH, LONG_TITLE.replace("val confusion", "training history") * 2, best_epoch=1)
    _inside_figure(fig, fig._suptitle)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, digits_small, tiny_hub) -> Path:
    """6 digits per class through the tiny BatchNorm net: a cache in a second or two."""
    from pipeline.extract import run_extract

    out = tmp_path_factory.mktemp("plots") / "tiny.h5"
    run_extract(digits_small, tiny_hub, "none", out, batch_size=64, workers=0)
    return out


def test_a_named_heads_reports_carry_its_name_and_kept_epoch(tiny_cache, tmp_path, monkeypatch):
    from pipeline.heads.fit import fit_head

    titles: list[str] = []
    real_save = metrics.save_figure

    def recording_save(fig, path, dpi=100):
        titles.extend(t.get_text() for t in [fig._suptitle, *(ax.title for ax in fig.axes)] if t is not None and t.get_text())
        return real_save(fig, path, dpi)

    monkeypatch.setattr(metrics, "save_figure", recording_save)
    r = fit_head(tiny_cache, "mlp", tmp_path / "h.pt", title="mlp-wide", epochs=1)
    assert {"history_png", "confusion_val_png"} <= set(r.reports)
    assert titles and all("mlp-wide" in " ".join(t.split()) for t in titles), titles
    blob = json.loads(Path(r.reports["metrics_json"]).read_text())
    assert [h["epoch"] for h in blob["history"]] == [1] and blob["best_epoch"] == 1
    img = _pixels(Path(r.reports["history_png"]))
    assert _has_colour(img, TRAIN_COLOR) and _has_colour(img, VAL_COLOR) and _has_colour(img, KEPT_COLOR)


def test_a_one_epoch_finetunes_reports_show_epoch_0_and_the_kept_epoch(tiny_head, tmp_path):
    from pipeline.finetune.run import run_finetune

    r = run_finetune(tiny_head, tmp_path / "ft.pt", options={"batch_size": 8, "augment": "light", "epochs": 1}, workers=0, trust_hub=True)
    assert [h["epoch"] for h in r.history] == [1]  # the result's history is the trained epochs only
    blob = json.loads(Path(r.reports["metrics_json"]).read_text())
    assert [h["epoch"] for h in blob["history"]] == [0, 1] and blob["best_epoch"] == r.best_epoch
    assert {"val_loss", "val_accuracy"} <= set(blob["history"][0])
    img = _pixels(Path(r.reports["history_png"]))
    assert _has_colour(img, TRAIN_COLOR) and _has_colour(img, VAL_COLOR) and _has_colour(img, KEPT_COLOR)
