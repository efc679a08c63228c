"""Classification metrics and their pictures (no training here)."""
from __future__ import annotations

import functools
import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..names import printable
from ..store import atomic_path


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, top-5 (> 5 classes), macro F1, log loss, per-class P/R/F1, confusion matrix.

    ``y_true`` holds indices into ``class_names``; ``proba`` is [N, C] in that order.
    """
    running = RunningMetrics(class_names)
    running.add(y_true, proba)
    return running.result()


class RunningMetrics:
    """``classification_metrics`` over predictions that arrive a chunk at a time: a confusion
    matrix, a log-loss sum and a top-5 count are all it holds (C x C, whatever N), and the
    result equals scikit-learn's on every row at once (its clipping, its tie order for top-5)."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        c = len(self.class_names)
        self.confusion = np.zeros((c, c), dtype=np.int64)
        self.loss_sum = 0.0
        self.top5_hits = 0

    def add(self, y_true: np.ndarray, proba: np.ndarray) -> None:
        """One chunk: labels (indices into the classes) and [n, C] probabilities."""
        y = np.asarray(y_true, dtype=np.int64)
        c = len(self.class_names)
        if not len(y):
            return
        if y.min() < 0 or y.max() >= c or proba.shape != (len(y), c):
            raise ValueError(f"labels must lie in [0, {c}) and probabilities be [{len(y)}, {c}] (got {proba.shape})")
        pred = proba.argmax(axis=1)
        self.confusion += np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
        p = proba / proba.sum(axis=1, keepdims=True)
        eps = np.finfo(p.dtype).eps
        self.loss_sum += float(-np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps)).sum(dtype=np.float64))
        if c > 5:
            top = np.argsort(proba, axis=1, kind="mergesort")[:, ::-1][:, :5]
            self.top5_hits += int((top == y[:, None]).any(axis=1).sum())

    def merge(self, others: Sequence[RunningMetrics]) -> RunningMetrics:
        """These counts plus ``others``' (the shares of torchrun ranks): the metrics of all their rows."""
        for o in others:
            self.confusion += o.confusion
            self.loss_sum += o.loss_sum
            self.top5_hits += o.top5_hits
        return self

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def result(self) -> dict[str, Any]:
        cm, n = self.confusion, self.n
        support, predicted, right = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
        # 0 where nothing was predicted / present, as scikit-learn's zero_division=0 (the denominators are never 0)
        precision = right / np.maximum(predicted, 1)
        recall = right / np.maximum(support, 1)
        f1 = 2 * right / np.maximum(support + predicted, 1)  # 2 tp / (2 tp + fp + fn), as scikit-learn
        out: dict[str, Any] = {
            "n": n,
            "accuracy": float(right.sum() / n) if n else 0.0,
            "macro_f1": float(f1.mean()) if len(f1) else 0.0,
            "log_loss": self.loss_sum / n if n else float("nan"),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
                          for i, name in enumerate(self.class_names)},
            "confusion_matrix": cm.tolist(),
        }
        if len(self.class_names) > 5:
            out["top5_accuracy"] = self.top5_hits / n if n else 0.0
        return out


def format_metrics(name: str, m: dict[str, Any]) -> str:
    head = f"{name}: n={m['n']}  accuracy={m['accuracy']:.4f}  macro_f1={m['macro_f1']:.4f}  log_loss={m['log_loss']:.4f}"
    if "top5_accuracy" in m:
        head += f"  top5={m['top5_accuracy']:.4f}"
    per_class = {printable(c): v for c, v in m["per_class"].items()}  # a newline in a class name must not start a row
    width = max(len(c) for c in per_class)
    rows = [f"  {'class':<{width}}  precision  recall     f1  support"]
    rows += [f"  {c:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}" for c, v in per_class.items()]
    return "\n".join([head, *rows])


def format_leaderboard(rows: list[dict[str, Any]]) -> list[str]:
    """``compare``'s table: rank, backbone / head, accuracy, macro F1, fit seconds, embedding
    size; every column as wide as its longest cell (a timm or hub backbone name runs long)."""
    header = ("rank", "backbone / head", "accuracy", "macro_f1", "fit s", "dim")
    cells = [(str(i), printable(str(r["name"])), f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['fit_seconds']:.1f}", str(r["embed_dim"]))
             for i, r in enumerate(rows, 1)]
    widths = [max(len(c[k]) for c in [header, *cells]) for k in range(len(header))]

    def line(c: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if k == 1 else v.rjust(w) for k, (v, w) in enumerate(zip(c, widths))).rstrip()

    return [line(header), *(line(c) for c in cells)]


TRAIN_COLOR = "#1f77b4"  # train is always blue, val always orange, the kept epoch green (in every panel)
VAL_COLOR = "#ff7f0e"
KEPT_COLOR = "#2ca02c"
TICK_LABEL_CHARS = 32  # longer class names are shortened on the axes (metrics.json has them whole)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Drawn = TypeVar("Drawn")


def literal_text(draw: Callable[..., Drawn]) -> Callable[..., Drawn]:
    """Run ``draw`` with matplotlib's math text off. Class names, paths and titles are the
    user's text, drawn as written: a ``$`` in one (a folder named ``$\\frac{a$``) would
    otherwise be parsed as TeX and fail the whole figure. Every function of ours that creates
    or renders a figure carries it (text made outside it would still be parsed at render)."""

    @functools.wraps(draw)
    def plain(*args: Any, **kwargs: Any) -> Drawn:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain


@literal_text
def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write atomically as PNG, and free the figure."""
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def _wrap_to_figure(text_artist, fig, margin: float = 0.98) -> None:
    """Re-wrap a title (``textwrap``) until its rendered width fits inside the figure."""
    text = " ".join(text_artist.get_text().split())
    if not text:
        return
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width * margin
    width = len(text)
    text_artist.set_text(text)
    while width > 8:
        box = text_artist.get_window_extent(renderer)
        if box.width <= limit and box.x0 >= 0 and box.x1 <= fig.bbox.width:
            return
        width = max(8, min(width - 1, int(width * limit / max(box.width, 1.0))))
        text_artist.set_text(textwrap.fill(text, width, break_long_words=True))


def _finish(fig, *titles) -> None:
    """Lay out, wrap each title to fit the figure, lay out again (room for the extra lines)."""
    fig.tight_layout()
    for t in titles:
        _wrap_to_figure(t, fig)
    fig.tight_layout()


def _short(name: str, limit: int = TICK_LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


CELL_LABEL_MAX_CLASSES = 20  # up to this many classes each cell carries its count; above it the numbers cannot be read
TOP_CONFUSIONS = 10  # (true, predicted) pairs listed beside a matrix too large for per-cell counts
TICK_MIN_POINTS = 5.0  # smallest tick label font; denser classes get every k-th name


def top_confusions(matrix: list[list[int]] | np.ndarray, class_names: Sequence[str], n: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
    """The ``n`` most frequent mistakes as (true, predicted, count), most frequent first (ties in
    matrix order); pairs never confused are left out."""
    cm = np.asarray(matrix)
    if cm.ndim != 2 or not cm.size:
        return []
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [np.unravel_index(k, off.shape) for k in flat]
    return [(str(class_names[t]), str(class_names[p]), int(off[t, p])) for t, p in pairs if off[t, p] > 0]


def _ticks(ax, labels: list[str], size_inches: float) -> None:
    """Every class name on both axes when a font of ``TICK_MIN_POINTS`` or more fits its cell, else every k-th."""
    n = len(labels)
    cell_points = 72.0 * size_inches / max(n, 1)
    fontsize = min(8.0, 0.8 * cell_points)
    step = 1
    if fontsize < TICK_MIN_POINTS:
        step = math.ceil(TICK_MIN_POINTS / fontsize)
        fontsize = TICK_MIN_POINTS
    at = list(range(0, n, step))
    ax.set_xticks(at, [labels[i] for i in at], rotation=90, fontsize=fontsize)
    ax.set_yticks(at, [labels[i] for i in at], fontsize=fontsize)


@literal_text
def confusion_figure(matrix: list[list[int]], class_names: Sequence[str], title: str, max_inches: float | None = None):
    """The confusion matrix as a figure sized for its classes and their (shortened) names.

    Up to ``CELL_LABEL_MAX_CLASSES`` classes every cell carries its count. Above that the matrix
    is a heatmap (no per-cell text: thousands of unreadable labels were most of fit-head's time),
    with small or thinned tick labels, and a second panel lists the ``TOP_CONFUSIONS`` most
    frequent (true → predicted) pairs as bars. ``max_inches`` caps the matrix (the HTML report).
    The counts stay whole in metrics.json."""
    plt = pyplot()
    cm = np.asarray(matrix)
    labels = [_short(str(c)) for c in class_names]
    if len(labels) <= CELL_LABEL_MAX_CLASSES:
        label_room = 0.09 * max((len(c) for c in labels), default=0)  # inches for the tick labels
        size = max(4.0, 0.5 * len(labels) + 2)
        if max_inches:
            size = min(size, max_inches)
        fig, ax = plt.subplots(figsize=(max(size + label_room, 5.0), size + label_room))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        peak = cm.max() if cm.size else 0
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > peak / 2 else "black", fontsize=8)
        _finish(fig, ax.set_title(title))
        return fig
    size = min(max(8.0, 0.16 * len(labels)), max_inches or 12.0)
    pairs = top_confusions(cm, class_names)
    label_room = 0.06 * max((len(c) for c in labels), default=0)
    bar_width = 5.5 if pairs else 0.0
    fig = plt.figure(figsize=(size + label_room + bar_width, size + label_room + 0.6))
    if pairs:
        ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [size + label_room, bar_width]})
    else:
        ax, bars = fig.subplots(), None
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    _ticks(ax, labels, size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, label="images")
    if bars is not None:
        names = [f"{_short(t, 20)} → {_short(p, 20)}" for t, p, _ in pairs][::-1]
        counts = [c for _, _, c in pairs][::-1]
        bars.barh(range(len(names)), counts, color=VAL_COLOR)
        bars.set_yticks(range(len(names)), names, fontsize=8)
        for i, c in enumerate(counts):
            bars.text(c, i, f" {c}", va="center", ha="left", fontsize=8)
        bars.set_xlim(0, max(counts) * 1.2)
        bars.xaxis.set_major_locator(_integer_locator())
        bars.set_xlabel("images")
        bars.set_title(f"most frequent confusions (top {len(pairs)}): true → predicted", fontsize=9)
    _wrap_to_figure(fig.suptitle(title), fig)  # centred on the figure: its width does not depend on the layout
    fig.tight_layout()  # one layout: each one measures every tick label
    return fig


def plot_confusion(matrix: list[list[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    return save_figure(confusion_figure(matrix, class_names, title), path)


def kept_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch a torch head keeps: the first to improve the best val loss by more than 1e-6
    (the rule of ``TorchHead.fit_source`` and the grid); the last epoch when none was validated."""
    best, kept = math.inf, None
    for h in history:
        loss = h.get("val_loss")
        if loss is not None and np.isfinite(loss) and loss < best - 1e-6:
            best, kept = loss, h["epoch"]
    if kept is None and history:
        kept = history[-1]["epoch"]
    return kept


def _series(history: list[dict[str, Any]], key: str) -> list[float] | None:
    """One value per epoch (NaN where an epoch lacks it), or None when no epoch has it."""
    if not any(h.get(key) is not None for h in history):
        return None
    return [float(h[key]) if h.get(key) is not None else np.nan for h in history]


def _history_panel(ax, epochs: list[int], history: list[dict[str, Any]], what: str, best_epoch: int | None) -> None:
    """train and val ``what`` (loss or accuracy) with a marker on every point, and the kept epoch."""
    drawn = False
    for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
        values = _series(history, f"{split}_{what}")
        if values is not None:
            ax.plot(epochs, values, marker="o", markersize=6 if len(epochs) <= 40 else 3, color=color, label=split)
            drawn = True
    if best_epoch is not None:
        ax.axvline(best_epoch, color=KEPT_COLOR, linestyle="--", linewidth=1.5, label=f"kept: epoch {best_epoch}")
        val = _series(history, f"val_{what}") or []
        at = [v for e, v in zip(epochs, val) if e == best_epoch and np.isfinite(v)]
        if at:
            ax.plot([best_epoch], at[:1], marker="*", markersize=20, markerfacecolor="none", markeredgewidth=2, color=KEPT_COLOR,
                    linestyle="none", zorder=3)  # hollow: the val dot stays visible inside
    if not drawn:
        ax.text(0.5, 0.5, f"no {what} recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
    lo, hi = min(epochs), max(epochs)
    pad = max(0.5, 0.05 * (hi - lo))  # a single epoch still gets a visible range around it
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.margins(y=0.1)  # markers at the extremes stay whole
    ax.set_xlabel("epoch")
    ax.set_ylabel(what)
    if drawn or best_epoch is not None:
        ax.legend()


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True, min_n_ticks=1)


@literal_text
def history_figure(history: list[dict[str, Any]], title: str, best_epoch: int | None = None):
    """Loss and accuracy per epoch, train and val in the same colours in both panels."""
    plt = pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    _history_panel(a1, epochs, history, "loss", best_epoch)
    _history_panel(a2, epochs, history, "accuracy", best_epoch)
    _finish(fig, fig.suptitle(title))
    return fig


def plot_history(history: list[dict[str, Any]], path: Path, title: str, best_epoch: int | None = None) -> Path:
    return save_figure(history_figure(history, title, best_epoch), path)


@literal_text
def leaderboard_figure(rows: list[dict[str, Any]], title: str):
    """Validation accuracy per row (best first, at the top), each bar labelled with its value."""
    plt = pyplot()
    names = [_short(str(r["name"]), 60) for r in rows][::-1]
    values = [float(r["accuracy"]) for r in rows][::-1]
    width = 8.0 + 0.07 * max((len(n) for n in names), default=0)
    fig, ax = plt.subplots(figsize=(width, 0.5 * len(rows) + 1.8))
    ax.barh(range(len(names)), [v if np.isfinite(v) else 0.0 for v in values], color=TRAIN_COLOR)
    ax.set_yticks(range(len(names)), names)
    for i, v in enumerate(values):
        ax.text((v if np.isfinite(v) else 0.0) + 0.01, i, f"{v:.4f}" if np.isfinite(v) else "n/a", va="center", ha="left", fontsize=9)
    top = max([v for v in values if np.isfinite(v)] + [1.0])
    ax.set_xlim(0, top * 1.15)  # room for the labels right of the bars
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("validation accuracy")
    _finish(fig, ax.set_title(title))
    return fig


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    return save_figure(leaderboard_figure(rows, title), path)


REPORT_SUFFIXES = (".metrics.json", ".confusion_val.png", ".confusion_test.png", ".history.png", ".grid.png", ".report.html")
REPORTS_NEED = 2 << 20  # bytes a set of reports may take (PNGs of a many-class confusion matrix)


def clear_reports(artifact_path: Path) -> None:
    """Remove an artifact's reports before the artifact is replaced: they are views of it,
    so a run killed between the two leaves reports missing (regenerated by the next run),
    never the previous fit's reports beside the new artifact."""
    base = artifact_path.name.removesuffix(".pt")
    for suffix in REPORT_SUFFIXES:
        artifact_path.with_name(base + suffix).unlink(missing_ok=True)


def write_reports(artifact_path: Path, metrics: dict[str, Any], classes: list[str], history: list[dict], title: str, plots: bool = True,
                  best_epoch: int | None = None) -> dict[str, str]:
    """``<artifact>.metrics.json`` (metrics, history, kept epoch), confusion and history PNGs beside the artifact.

    ``best_epoch`` is the epoch whose model was kept (marked on the history plot)."""
    reports: dict[str, str] = {}
    base = artifact_path.with_name(artifact_path.name.removesuffix(".pt"))
    mpath = Path(f"{base}.metrics.json")
    blob: dict[str, Any] = {"metrics": metrics, "history": history}
    if best_epoch is not None:
        blob["best_epoch"] = int(best_epoch)
    with atomic_path(mpath) as tmp:
        tmp.write_text(json.dumps(blob, indent=2))
    reports["metrics_json"] = str(mpath)
    if plots:
        for s in ("val", "test"):
            if s in metrics:
                reports[f"confusion_{s}_png"] = str(plot_confusion(metrics[s]["confusion_matrix"], classes, Path(f"{base}.confusion_{s}.png"), f"{title}: {s} confusion"))
        if history:
            reports["history_png"] = str(plot_history(history, Path(f"{base}.history.png"), f"{title}: training history", best_epoch))
    return reports
