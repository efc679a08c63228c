"""The demo: scikit-learn's handwritten digits as an image folder, run through every stage.

``load_digits()`` ships inside scikit-learn (no download): 1,797 real 8x8 grey digits in
10 classes. Written out upscaled as RGB PNGs, it is small, offline, deterministic, and a
head must really learn to separate it. The demo splits it train/val/test so that what it
predicts at the end are images no stage trained on or chose anything with.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[str], Callable[[int, int, float], None] | None]

DIGIT_CLASSES = [f"digit_{d}" for d in range(10)]


def write_digits(root: str | Path, size: int = 64, per_class: int | None = None, split: bool = False, seed: int = 0) -> Path:
    """Write the digits under ``root`` (ImageFolder, or train/val when ``split``); idempotent.

    ``per_class`` keeps the first N images of each class (fast tests); ``split`` puts a
    deterministic 70/15/15 of the images into ``train/``, ``val/`` and ``test/``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {c: 0 for c in range(10)}
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        target = int(target)
        if per_class is not None and counts[target] >= per_class:
            continue
        counts[target] += 1
        grey = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        pil = Image.fromarray(255 - grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        draw = rng.random()
        sub = ("train" if draw < 0.7 else "val" if draw < 0.85 else "test") if split else ""
        folder = root / sub / DIGIT_CLASSES[target] if sub else root / DIGIT_CLASSES[target]
        folder.mkdir(parents=True, exist_ok=True)
        target_path = folder / f"{i:04d}.png"
        if not target_path.exists():
            pil.save(target_path, optimize=False)
    return root


def run_demo(workdir: Path, model: str = "resnet18", weights: str = "none", finetune_epochs: int = 1, *,
             progress: ProgressFactory = lambda label: None, show: bool = True) -> dict[str, Any]:
    """extract -> status -> fit-head -> finetune -> predict -> report, saying what each stage
    did, and ending with every file it wrote. Returns the JSON summary. ``model`` is the user's
    choice, so its ``hub:`` source is trusted for the head and model the demo itself writes."""
    from .extract import run_extract
    from .finetune import run_finetune
    from .heads import fit_head, format_metrics
    from .predict import predict_images
    from .report import write_report
    from .status import cache_status, format_cache_status

    workdir = Path(workdir)
    data = write_digits(workdir / "digits", split=True)
    name = f"digits_{model}_{weights}".lower()
    cache = workdir / "cache" / f"{name}.h5"
    logger.info(f"[1/6] extract {data} (train/ val/ test/) with {model}, weights {weights} -> {cache}")
    summary = run_extract(data, model, weights, cache, progress=progress("extract"))
    logger.info(f"      {summary.new} new, {summary.cached} cached, {summary.failed} failed in {summary.seconds:.1f}s")
    logger.info("[2/6] what the cache holds")
    info = cache_status(cache)
    if show:
        logger.info(format_cache_status(info))
    head = workdir / "heads" / f"{name}.logreg.head.pt"
    logger.info(f"[3/6] fit-head --clf logreg on train/ (C chosen by cross-validation on train/), scored on val/ and test/ -> {head}")
    fit = fit_head(cache, "logreg", head)
    logger.info(f"      fitted on {fit.n_train} rows in {fit.seconds:.1f}s")
    if show:
        for split in ("val", "test"):
            logger.info(format_metrics(split, fit.metrics[split]).splitlines()[0])
    predictor, tuned, verdict = head, None, "skipped (--finetune-epochs 0)"
    if finetune_epochs > 0:
        model_path = workdir / "models" / f"{name}.finetuned.pt"
        logger.info(f"[4/6] finetune {finetune_epochs} epoch(s) end to end (BatchNorm frozen) from the logreg head -> {model_path}")
        tuned = run_finetune(head, model_path, options=DEMO_FINETUNE | {"epochs": finetune_epochs}, force=True, progress=progress("train"),
                             trust_hub=[model])
        verdict = _finetune_verdict(fit.metrics["val"]["accuracy"], tuned)
        logger.info(f"      {verdict}")
        predictor = Path(tuned.model_path)
    else:
        logger.info(f"[4/6] finetune {verdict}")
    picks = [p for c in sorted((data / "test").iterdir()) for p in sorted(c.iterdir())[:2]]
    csv, grid = workdir / "predictions.csv", workdir / "predictions.png"
    logger.info(f"[5/6] predict {len(picks)} held-out images from {data / 'test'} (no stage trained on them or chose anything with them) with {predictor.name}")
    pred = predict_images(predictor, picks, csv, grid, trust_hub=[model])
    right = sum(r["true"] == r["predicted"] for r in pred.rows)
    logger.info(f"      {right}/{len(pred.rows)} correct on held-out test images")
    report_path = workdir / "report.html"
    logger.info(f"[6/6] report on the logreg head and its data (mistakes, label errors, duplicates, map) -> {report_path}")
    report = write_report(head, out=report_path)
    logger.info(f"      {report.mistakes} val mistakes, {report.counts['label-errors']} likely label errors, {report.counts['duplicates']} near-duplicate pairs; "
                f"open it in a browser (one file, no network)")
    files = _written_files(data, summary.cache, fit, tuned, pred) + [("report", str(report_path))]
    logger.info("files written:")
    for what, path in files:
        logger.info(f"  {what:<25} {path}")
    return {"extract": summary.to_dict(), "status": info, "fit_head": {"head": fit.head_path, "metrics": fit.metrics, "reports": fit.reports},
            "finetune": tuned.to_dict() if tuned else None, "finetune_verdict": verdict,
            "predict": {"csv": pred.csv, "grid": pred.grid, "correct": right, "n": len(pred.rows), "images": "held-out test split"},
            "report": report.to_dict(),
            "files": [{"what": what, "path": str(path)} for what, path in files]}


# The demo's fine-tune: one quick epoch that trains the last block and the head (a full
# backbone epoch on 2 CPU cores takes minutes); light augmentation (crops, no flips: a flipped digit is another glyph).
DEMO_FINETUNE: dict[str, Any] = {"unfreeze": "last:1", "augment": "light"}


def _finetune_verdict(head_val: float, tuned: Any) -> str:
    """One plain sentence: did fine-tuning improve on the fitted head, and if not, what was kept."""
    tuned_val = tuned.metrics["val"]["accuracy"]
    if tuned.best_epoch > 0:
        return (f"fine-tuning improved validation accuracy from {head_val:.4f} (the fitted head) to {tuned_val:.4f} "
                f"(kept epoch {tuned.best_epoch} of {tuned.epochs_done}, {tuned.seconds:.0f}s)")
    return (f"fine-tuning did not beat the fitted head on validation in {tuned.epochs_done} epoch(s) ({tuned.seconds:.0f}s): the model keeps the "
            f"head as fitted (epoch 0, val {tuned_val:.4f}). More epochs (--finetune-epochs) or pretrained weights usually change that.")


def _written_files(data: Path, cache: str, fit: Any, tuned: Any, pred: Any) -> list[tuple[str, str]]:
    files = [("images", f"{data}/{{train,val,test}}/"), ("cache", cache), ("head", fit.head_path)]
    files += [(f"head {name.replace('_', ' ')}", path) for name, path in fit.reports.items()]
    if tuned is not None:
        files += [("fine-tuned model", tuned.model_path), ("its checkpoint", tuned.checkpoint)]
        files += [(f"model {name.replace('_', ' ')}", path) for name, path in tuned.reports.items()]
        history = Path(tuned.model_path).with_name(Path(tuned.model_path).name.removesuffix(".pt") + ".history.json")
        files += [("model history json", str(history))] if history.is_file() else []
    files += [("predictions csv", pred.csv), ("predictions picture", pred.grid)]
    return [(what, str(path)) for what, path in files if path]
