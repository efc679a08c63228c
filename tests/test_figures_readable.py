"""Readable figures and reports (issue #30, items 2 and 5): per-cell counts only where they can be
read, a top-confusions panel above that; train and val curves in both history panels; a one-row
prediction grid keeps its titles; the report says what applies; compare takes --out and aligns."""
from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.heads.metrics import CELL_LABEL_MAX_CLASSES, confusion_figure, format_leaderboard, history_figure, pyplot, top_confusions

HAND_MADE = [[5, 2, 0, 1],
             [0, 6, 3, 0],
             [4, 0, 7, 0],
             [0, 0, 1, 8]]


def _confusion(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 3, (n, n))
    np.fill_diagonal(cm, 40)
    return cm


def _close(fig) -> None:
    pyplot().close(fig)


def test_top_confusions_lists_the_most_frequent_off_diagonal_pairs():
    names = ["a", "b", "c", "d"]
    assert top_confusions(HAND_MADE, names, 3) == [("c", "a", 4), ("b", "c", 3), ("a", "b", 2)]
    assert top_confusions(HAND_MADE, names, 10) == [("c", "a", 4), ("b", "c", 3), ("a", "b", 2), ("a", "d", 1), ("d", "c", 1)]  # ties in matrix order
    assert top_confusions(np.diag([3, 4]), ["x", "y"]) == []  # nothing confused: nothing listed


def test_per_cell_counts_for_few_classes_only():
    small = [row[:3] for row in HAND_MADE[:3]]
    fig = confusion_figure(small, ["a", "b", "c"], "logreg: val confusion")
    (ax,) = fig.axes
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for row in small for v in row)  # one count per cell
    _close(fig)

    n = 54
    assert n > CELL_LABEL_MAX_CLASSES
    cm = _confusion(n)
    cm[7, 3] = 30  # the most frequent confusion by far
    names = [f"class_{i:02d}" for i in range(n)]
    t0 = time.perf_counter()
    fig = confusion_figure(cm.tolist(), names, "logreg: val confusion")
    fig.savefig(io.BytesIO(), format="png", dpi=100)
    seconds = time.perf_counter() - t0
    matrix = fig.axes[0]
    (panel,) = [ax for ax in fig.axes if ax.get_title().startswith("most frequent confusions")]
    assert len(matrix.texts) == 0  # no per-cell labels (2,916 of them took seconds and could not be read)
    texts = sum(len(a.texts) for a in fig.axes)
    assert texts <= 20, texts
    labels = [t.get_text() for t in panel.get_yticklabels()][::-1]  # the bars: most frequent at the top
    assert labels[0] == "class_07 → class_03" and len(labels) == 10
    assert [t.get_text().strip() for t in panel.texts][::-1][0] == "30"
    ticks = matrix.get_xticklabels()
    assert 10 <= len(ticks) <= n and min(t.get_fontsize() for t in ticks) >= 5  # small, thinned only if needed, still legible
    assert seconds < 10, seconds  # (about 0.5 s uncontended; the old figure took over 4 s on the same machine)
    _close(fig)


def _blobs(n_per: int = 30, k: int = 3, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (k, d))
    X = np.concatenate([centers[c] + rng.normal(0, 1, (n_per, d)) for c in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return X, y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_torch_heads_record_train_accuracy_and_plot_train_and_val_in_both_panels(kind):
    from pipeline.heads.estimators import make_head
    from pipeline.heads.metrics import kept_epoch

    X, y = _blobs()
    head = make_head(kind, epochs=3, device="cpu", batch_size=16)
    head.fit(X[::2], y[::2], X[1::2], y[1::2])
    assert len(head.history_) == 3
    for row in head.history_:
        assert 0.0 <= row["train_accuracy"] <= 1.0 and "val_accuracy" in row
    assert head.history_[-1]["train_accuracy"] > 0.5  # separable blobs (chance 0.33)
    fig = history_figure(head.history_, f"{kind}: training history", kept_epoch(head.history_))
    for ax in fig.axes:
        drawn = {ln.get_label() for ln in ax.get_lines()}
        assert {"train", "val"} <= drawn, (ax.get_ylabel(), drawn)
    _close(fig)


def test_a_grid_records_train_accuracy():
    from pipeline.heads.estimators import ArraySource, make_head
    from pipeline.heads.grid import fit_grid, grid_members

    X, y = _blobs()
    template = make_head("mlp", epochs=2, device="cpu", batch_size=16)
    head, board = fit_grid(template, grid_members((1e-3, 3e-3), (1e-4,), ((16,),)), ArraySource(X[::2], y[::2]), ArraySource(X[1::2], y[1::2]),
                           np.unique(y), X.shape[1])
    assert len(board) == 2 and all(0.0 <= h["train_accuracy"] <= 1.0 for h in head.history_)


def test_a_one_row_prediction_grid_keeps_its_titles_inside(tmp_path, monkeypatch):
    from pipeline import heads
    from pipeline.predict import plot_grid

    figures = []
    real = heads.save_figure

    def keep(fig, path, dpi=100):
        figures.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(heads, "save_figure", keep)
    rows = []
    for i, name in enumerate(["digit_1", "a_class_name_long_enough_to_run_into_its_neighbour", "x"]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(p)
        rows.append({"path": str(p), "predicted": name, "probability": 0.87, "true": "digit_1"})
    plot_grid(rows, tmp_path / "grid.png")
    (fig,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # (the saved figure was closed: a canvas again, to measure as the PNG was drawn)
    fig.savefig(io.BytesIO(), format="png", dpi=80)
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 3
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    for left, right in itertools.pairwise(boxes):
        assert left.x1 <= right.x0  # neighbouring titles do not overlap
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_report_split_rule_tiles_and_advice_say_what_applies():
    from pipeline.report import build, sections

    prov = {"n_train": 10, "n_val": 3, "n_test": 2, "layout": "split"}
    assert sections.split_rule({"kind": "folders", "val_fraction": 0.2, "seed": 0}, prov) == "from the folders train/ val/ test/"
    assert sections.split_rule({"kind": "folders", "val_fraction": 0.2, "seed": 0}, {**prov, "n_test": 0}) == "from the folders train/ val/"
    assert sections.split_rule({"kind": "hash", "val_fraction": 0.2, "seed": 3}, prov) == "random (hash of each path): val_fraction 0.2, seed 3"

    main = {"accuracy": 0.9, "macro_f1": 0.8, "log_loss": 0.3}
    html = sections.summary(main, None, ["do this"], [], "val", ["a fact"])
    assert "val accuracy" in html and "val macro F1" in html and ">accuracy<" not in html
    assert "accuracy (all labelled rows)" in sections.summary(main, None, [], [], "all")
    assert html.index("do this") < html.index("</ol>") < html.index("a fact")  # the fact is not an item of the advice

    todo, facts = build._advice_and_findings(["3 suspected label errors in class 1 (most look like 7): check them and fix or drop the labels",
                                              "2 more suspected label errors in 2 other classes",
                                              "nothing stands out: no likely label errors, near-duplicates, leaks, imbalance or failed files"])
    assert len(todo) == 2 and all(":" in t for t in todo) and facts == ["Nothing stands out: no likely label errors, near-duplicates, leaks, imbalance or failed files."]
    assert build._without_confusions({"accuracy": 1.0, "confusion_matrix": [[1]]}) == {"accuracy": 1.0}
    line = sections.confusions_line(HAND_MADE, ["a", "b", "c", "d"], "val")
    assert line == "most frequent confusions (val, true → predicted): c → a (4), b → c (3), a → b (2)"


def test_report_metrics_list_the_top_confusions_of_a_many_class_matrix():
    from pipeline.report import sections

    n = 30
    cm = _confusion(n)
    cm[4, 9] = 25
    names = [f"c{i}" for i in range(n)]
    per_class = {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": int(cm[i].sum())} for i, c in enumerate(names)}
    scores = {"val": {"n": int(cm.sum()), "accuracy": 0.5, "macro_f1": 0.5, "log_loss": 1.0, "per_class": per_class, "confusion_matrix": cm.tolist()}}
    loaded = SimpleNamespace(extra={}, kind="logreg")
    html = sections.metrics(loaded, scores, {"scored": None})
    assert "Most frequent confusions (val)" in html and "<td>c4</td><td>c9</td><td class=num>25</td>" in html


def test_format_leaderboard_fits_long_backbone_names():
    rows = [{"name": "timm:vit_large_patch14_clip_224.openai_ft_in12k_in1k (DEFAULT) · logreg", "accuracy": 0.91234, "macro_f1": 0.9, "fit_seconds": 12.3,
             "embed_dim": 1024},
            {"name": "resnet18 (none)", "accuracy": 0.5, "macro_f1": 0.45, "fit_seconds": 0.4, "embed_dim": 512}]
    lines = format_leaderboard(rows)
    assert len(lines) == 3
    for column in ("accuracy", "macro_f1", "dim"):  # every row's value ends where its header does
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in lines), (column, lines)
    assert lines[1].split()[-4:] == ["0.9123", "0.9000", "12.3", "1024"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, digits_small, tiny_hub) -> Path:
    from pipeline.extract import run_extract

    out = tmp_path_factory.mktemp("readable") / "tiny.h5"
    run_extract(digits_small, tiny_hub, "none", out, batch_size=64, workers=0)
    return out


def test_compare_writes_where_out_says_and_aligns_its_table(tiny_cache, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from pipeline.heads import compare_caches

    result = compare_caches([tiny_cache], "logreg", out_dir=tmp_path / "lib")
    assert Path(result["chart_png"]).parent == tmp_path / "lib" and Path(result["leaderboard"][0]["head"]).parent == tmp_path / "lib"

    out = tmp_path / "cli"
    run = CliRunner().invoke(app, ["compare", str(tiny_cache), "--clf", "logreg", "--clf", "knn", "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert (out / "leaderboard.logreg+knn.png").is_file()
    table = [line for line in run.output.splitlines() if line.startswith(("rank", "   1", "   2"))]
    assert len(table) == 3
    end = table[0].index("accuracy") + len("accuracy")
    assert all(line[end - 1] != " " for line in table), table  # the long hub:… label pushes every column, rows included
