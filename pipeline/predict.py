"""Predict classes of new images with a saved head (runs the head's own backbone; no cache)."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import HubTrust
from .errors import DataError
from .extract import embed_batch, prepare_model, resolve_device
from .heads import full_proba, literal_text, load_head
from .images import ImageFileDataset, ImageRecord, is_manifest, is_shards, make_loader, scan_source
from .store import atomic_path


@dataclass
class PredictResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    csv: str | None = None
    grid: str | None = None


def _collect(inputs: list[str | os.PathLike], classes: list[str]) -> list[tuple[Path, str | None, ImageRecord]]:
    """(absolute file, true class name or None, record to read it by) for every image named,
    under a folder, listed in a manifest or held in tar shards."""
    found: list[tuple[Path, str | None, ImageRecord]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() or is_manifest(p) or is_shards(p):
            scan = scan_source(p)
            for r in scan.records:
                true = scan.classes[r.label] if r.label >= 0 and scan.classes[r.label] in classes else None
                path = scan.root / r.relpath
                found.append((path, true, ImageRecord(str(path), -1, "", r.size, 0, str(scan.root / r.container) if r.container else "", r.offset)))
        elif p.is_file():  # a file inside a folder named like a class: that is its true label
            found.append((p.resolve(), p.parent.name if p.parent.name in classes else None, ImageRecord(str(p.resolve()), -1, "", 0, 0)))
        else:
            raise DataError(f"{str(p)!r} does not exist; pass image files, folders or a manifest")
    if not found:
        raise DataError("no images to predict; pass image files or a folder with images")
    return found


def predict_images(head_path: str | os.PathLike, inputs: list[str | os.PathLike], out_csv: str | os.PathLike | None = None,
                   grid_png: str | os.PathLike | None = None, topk: int = 5, batch_size: int = 32, workers: int = 0,
                   device: str = "auto", trust_hub: HubTrust = False) -> PredictResult:
    """Classify ``inputs`` with the head or fine-tuned model at ``head_path`` and its backbone.
    ``trust_hub``: consent to run the code of a ``hub:`` backbone the file names (``--trust-hub``);
    without it such a file is refused before any of that code runs.

    Raises:
        CacheError, UsageError, DataError, UntrustedCodeError, BackboneError, WeightsUnavailableError.
    """
    loaded = load_head(head_path)
    prov = loaded.provenance
    classes = list(prov["classes"])
    files = _collect(inputs, classes)
    backbone = loaded.load_backbone(trust_hub)
    dev = resolve_device(device)
    net = prepare_model(backbone, dev)
    records = [rec for _, _, rec in files]
    draft = backbone.preprocessing.draft_size if prov.get("decode") == "draft" else None  # decode as the training cache was
    loader = make_loader(ImageFileDataset(Path("/"), records, backbone.preprocessing.transform(), draft_size=draft), batch_size, workers, dev.type == "cuda")
    result = PredictResult()
    k = min(topk, len(classes))
    for batch in loader:
        result.failures += [(records[i].relpath, reason) for i, reason in batch.failures]
        if batch.images is None:
            continue
        proba = full_proba(loaded.head, embed_batch(net, batch.images, dev), len(classes))
        for i, p in zip(batch.positions, proba):
            order = np.argsort(-p)[:k]
            result.rows.append({
                "path": records[i].relpath, "predicted": classes[order[0]], "probability": float(p[order[0]]),
                "topk": [{"class": classes[j], "probability": float(p[j])} for j in order], "true": files[i][1] or "",
            })
    if out_csv is not None:
        with atomic_path(Path(out_csv)) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["path", "predicted", "probability", "topk", "true"])
                w.writeheader()
                w.writerows({**row, "topk": _topk_cell(row["topk"])} for row in result.rows)
        result.csv = str(out_csv)
    if grid_png is not None and result.rows:
        members = {r.relpath: (r.container, r.offset, r.size) for r in records if r.container}
        result.grid = str(plot_grid(result.rows, Path(grid_png), members=members))
    return result


def _topk_cell(topk: list[dict[str, Any]]) -> str:
    """The top-k list as one CSV cell: ``cat:0.9132;dog:0.0412``."""
    return ";".join(f"{t['class']}:{t['probability']:.4f}" for t in topk)


@literal_text
def plot_grid(rows: list[dict[str, Any]], path: Path, max_images: int = 32, members: dict[str, tuple[str, int, int]] | None = None) -> Path:
    """Images with predicted (and true) labels, green when right, red when wrong."""
    from .heads import pyplot, save_figure
    from .images import load_image

    plt = pyplot()

    rows = rows[:max_images]
    cols = min(8, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2 * cols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        ax.imshow(load_image(r["path"], member=(members or {}).get(r["path"])))
        label = f"{r['predicted']} {r['probability']:.2f}" + (f"\n(true {r['true']})" if r["true"] else "")
        color = "black" if not r["true"] else ("green" if r["true"] == r["predicted"] else "red")
        ax.set_title(label, fontsize=8, color=color)
    return save_figure(fig, path, dpi=80)
