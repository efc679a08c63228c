"""Every name-like option's accepted values, and the one rule that reads them.

The rule: a choice is matched case-insensitively (surrounding spaces ignored) and kept in
its canonical spelling, so ``--clf LogReg``, ``clf = "LOGREG"`` in a job file and
``FitOptions(clf="logreg")`` are the same head, and ``--weights None`` names the same cache
as ``--weights none``. This module imports nothing heavy: the command line builds its
``--help`` choices from these tuples before torch is loaded.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# stage 1
LAYOUTS: tuple[str, ...] = ("auto", "imagefolder", "split", "flat")
DTYPES = ("float32", "float16")
ENGINES = ("auto", "eager", "compile", "cudagraph", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DECODES = ("exact", "draft", "gpu")
GPU_DECODERS = ("auto", "nvimgcodec", "torchvision")  # --decode gpu's decoder library
TOKEN_POOLS = ("cls", "cls+mean")  # how a tapped token sequence (ViT) is pooled
# stage 2
HEAD_KINDS = ("logreg", "linear", "mlp", "knn")
TORCH_SCHEDULES = ("cosine", "step")
SELECT_ON = ("cv", "val")
CLASS_WEIGHTS = ("balanced",)
# stage 3
HEAD_MODES = ("from", "new")
AUGMENT_PRESETS = ("none", "light", "basic", "rotate", "strong")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
# report and audit
MAP_METHODS = ("pca", "umap", "tsne")  # the 2-D map: PCA always; UMAP (the umap extra) and t-SNE (scikit-learn) on a sample
LABEL_METHODS = ("prune_by_class", "prune_by_noise_rate")  # cleanlab find_label_issues filter_by methods featcache implements
NEAR_DUPLICATE_SEARCH = ("auto", "exact", "ann")  # auto: exact up to 200,000 rows, then the FAISS index (the ann extra), else exact on a sample
DUPLICATE_THRESHOLD = 0.96  # the default near-duplicate cosine (whitened space), calibrated in pipeline/quality/options.py; here so --help needs no torch
AUDIT_CHECKS = ("label-errors", "duplicates", "leaks", "imbalance", "failed-files")  # what `audit --fail-on` can fail on
# export and serving
MODEL_EXPORT_FORMATS = ("onnx",)  # export-model --format (export --format is pipeline.exchange.EXPORT_FORMATS)

_WEIGHTS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)?$")


def canonical(value: Any, choices: Iterable[str]) -> Any:
    """``value``'s canonical spelling among ``choices`` (case-insensitive); anything else is
    returned unchanged, for the caller's check to refuse with the list of choices."""
    if not isinstance(value, str):
        return value
    folded = value.strip().casefold()
    return next((c for c in choices if c.casefold() == folded), value)


def canonical_device(device: Any) -> Any:
    """``CPU`` -> ``cpu``, ``CUDA:0`` -> ``cuda:0``."""
    return device.strip().lower() if isinstance(device, str) else device


def canonical_weights(spec: Any) -> Any:
    """``none`` and ``DEFAULT`` in any case, torchvision weights names upper-cased
    (``imagenet1k_v2`` -> ``IMAGENET1K_V2``, as torchvision spells every member); a path
    (an existing file, or anything with a separator or suffix) is kept exactly."""
    if not isinstance(spec, str):
        return spec
    stripped = spec.strip()
    if stripped.casefold() == "none":
        return "none"
    if Path(stripped).is_file() or not _WEIGHTS_NAME.match(stripped):
        return spec
    if "." in stripped:  # ResNet50_Weights.IMAGENET1K_V2: the enum's name keeps its case; model.pt is a path
        enum, member = stripped.split(".")
        return f"{enum}.{member.upper()}" if enum.endswith("_Weights") else spec
    return stripped.upper()
