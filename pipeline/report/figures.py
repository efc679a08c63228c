"""The report's pictures as PNG ``data:`` URIs: the confusion matrix and training curves
(the heads' own figures, the same as their PNG reports) and the 2-D map of the embeddings."""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..heads import confusion_figure, history_figure, kept_epoch, literal_text, pyplot


@literal_text
def png_uri(fig, dpi: int = 90) -> str:
    """Lay out, encode as PNG, free the figure."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


CONFUSION_MAX_INCHES = 14.0  # the matrix's side at most (above CELL_LABEL_MAX_CLASSES it is a heatmap beside the top confusions)


def confusion_uri(matrix: list[list[int]], classes: Sequence[str], title: str) -> str:
    return png_uri(confusion_figure(matrix, classes, title, max_inches=CONFUSION_MAX_INCHES))


def history_uri(history: list[dict[str, Any]], title: str) -> str:
    return png_uri(history_figure(history, title, kept_epoch(history)))


@literal_text
def map_uri(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str], mistakes: np.ndarray, suspects: np.ndarray, title: str) -> str:
    """Points coloured by class (grey: unlabeled), mistakes as black crosses, likely label
    errors as red rings; ``mistakes`` / ``suspects`` index the points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 7))
    size = float(np.clip(12000 / max(len(xy), 1), 1.0, 30))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    unlabeled = labels < 0
    if unlabeled.any():
        ax.scatter(xy[unlabeled, 0], xy[unlabeled, 1], s=size, c="#bbbbbb", linewidths=0, label="unlabeled", rasterized=True)
    show_legend = len(classes) <= 20
    for k, name in enumerate(classes):
        members = labels == k
        if members.any():
            ax.scatter(xy[members, 0], xy[members, 1], s=size, color=cmap(k % cmap.N), linewidths=0, alpha=0.8,
                       label=str(name)[:24] if show_legend else None, rasterized=True)
    if len(mistakes):
        ax.scatter(xy[mistakes, 0], xy[mistakes, 1], s=max(size * 3, 20), marker="x", c="black", linewidths=1.2, label="misclassified (val/test)")
    if len(suspects):
        ax.scatter(xy[suspects, 0], xy[suspects, 1], s=max(size * 6, 45), facecolors="none", edgecolors="red", linewidths=1.3,
                   label="likely label error")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if show_legend or len(mistakes) or len(suspects):
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2 if size < 10 else 1, frameon=False)
    return png_uri(fig)
