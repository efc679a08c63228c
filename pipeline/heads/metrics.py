"""Classification metrics and their pictures (no training here)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support, top_k_accuracy_score

from ..store import atomic_path


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, top-5 (> 5 classes), macro F1, log loss, per-class P/R/F1, confusion matrix.

    ``y_true`` holds indices into ``class_names``; ``proba`` is [N, C] in that order.
    """
    n_classes = len(class_names)
    labels = np.arange(n_classes)
    pred = proba.argmax(axis=1)
    p, r, f, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(log_loss(y_true, proba / proba.sum(axis=1, keepdims=True), labels=labels)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])} for i, c in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
    if n_classes > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
    return out


def format_metrics(name: str, m: dict[str, Any]) -> str:
    head = f"{name}: n={m['n']}  accuracy={m['accuracy']:.4f}  macro_f1={m['macro_f1']:.4f}  log_loss={m['log_loss']:.4f}"
    if "top5_accuracy" in m:
        head += f"  top5={m['top5_accuracy']:.4f}"
    width = max(len(c) for c in m["per_class"])
    rows = [f"  {'class':<{width}}  precision  recall     f1  support"]
    rows += [f"  {c:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}" for c, v in m["per_class"].items()]
    return "\n".join([head, *rows])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write atomically as PNG, and free the figure."""
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def plot_confusion(matrix: list[list[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    plt = pyplot()
    cm = np.asarray(matrix)
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    return save_figure(fig, path)


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> Path:
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any("val_loss" in h for h in history):
        a1.plot(epochs, [h.get("val_loss", np.nan) for h in history], label="val")
        a2.plot(epochs, [h.get("val_accuracy", np.nan) for h in history], label="val")
    if any("train_accuracy" in h for h in history):
        a2.plot(epochs, [h.get("train_accuracy", np.nan) for h in history], label="train")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy"), a2.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    ax.barh(names[::-1], [r["accuracy"] for r in rows][::-1])
    ax.set_xlabel("validation accuracy")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    return save_figure(fig, path)


def write_reports(artifact_path: Path, metrics: dict[str, Any], classes: list[str], history: list[dict], title: str, plots: bool = True) -> dict[str, str]:
    """``<artifact>.metrics.json`` (metrics and history), confusion and history PNGs beside the artifact."""
    reports: dict[str, str] = {}
    base = artifact_path.with_name(artifact_path.name.removesuffix(".pt"))
    mpath = Path(f"{base}.metrics.json")
    with atomic_path(mpath) as tmp:
        tmp.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2))
    reports["metrics_json"] = str(mpath)
    if plots:
        for s in ("val", "test"):
            if s in metrics:
                reports[f"confusion_{s}_png"] = str(plot_confusion(metrics[s]["confusion_matrix"], classes, Path(f"{base}.confusion_{s}.png"), f"{title}: {s} confusion"))
        if history:
            reports["history_png"] = str(plot_history(history, Path(f"{base}.history.png"), f"{title}: training history"))
    return reports
