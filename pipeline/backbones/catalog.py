"""What ``--model`` accepts, by source, with embedding width and input size; and what
``--layer`` can tap in one model (``featcache models``)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import BackboneError, UsageError
from . import cadene, timm_models
from .registry import available_models, check_model_name, find_classifier, load_backbone
from .taps import layer_table, transformer_blocks

SOURCES = ("torchvision", "timm", "pretrainedmodels")
DETAIL_LIMIT = 100  # widths need each model built (on the meta device: no memory, ~10-50 ms each)


def _names(source: str, pattern: str) -> list[str]:
    pattern = pattern.lower()
    if source == "torchvision":
        return [n for n in available_models() if pattern in n]
    if source == "timm":
        return timm_models.list_models(pattern)
    return cadene.list_models(pattern)


def _on_meta(build) -> nn.Module | None:
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return build()
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: no width shown
        return None


def _details(source: str, name: str) -> dict[str, Any]:
    """Embedding width and input size, from the architecture alone (no weights, no memory)."""
    arch = name.split(":", 1)[-1]
    if source == "torchvision":
        size = torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]
        model = _on_meta(lambda: torchvision.models.get_model(arch, weights=None))
        dim = None
        if model is not None:
            _, layer = find_classifier(model, 1000)
            dim = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        return {"embed_dim": dim, "input_size": int(size)}
    if source == "timm":
        timm = timm_models.import_timm()
        model = _on_meta(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
        dim = None if model is None else int(getattr(model, "head_hidden_size", None) or model.num_features)
        size = timm.data.resolve_model_data_config(model)["input_size"][-1] if model is not None else None
        return {"embed_dim": dim, "input_size": size}
    pm = cadene._import()
    settings = next(iter(pm.pretrained_settings[arch].values()))
    model = _on_meta(lambda: pm.__dict__[arch](num_classes=settings["num_classes"], pretrained=None))
    dim = getattr(getattr(model, "last_linear", None), "in_features", None)
    return {"embed_dim": dim, "input_size": int(settings["input_size"][-1])}


def list_backbones(source: str | None = None, pattern: str = "", details: bool | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(models, notes): each ``{"name", "source"[, "embed_dim", "input_size"]}``; widths when
    ``details`` (default: when at most ``DETAIL_LIMIT`` models match); notes say which
    sources are not installed."""
    if source is not None and source not in SOURCES:
        raise UsageError(f"--source {source!r}: choose one of {', '.join(SOURCES)}")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for src in [source] if source else SOURCES:
        try:
            rows += [{"name": n, "source": src} for n in _names(src, pattern)]
        except BackboneError as exc:
            if source:
                raise
            notes.append(str(exc))
    if details is None:
        details = len(rows) <= DETAIL_LIMIT
    if details:
        for row in rows:
            row.update(_details(row["source"], row["name"]))
    elif rows:
        notes.append(f"{len(rows)} models: add --filter WORD (or --details) to see embedding widths and input sizes")
    return rows, notes


def list_layers(model: str, depth: int = 2) -> dict[str, Any]:
    """The modules of ``model`` that ``--layer`` can tap (up to ``depth`` dots deep), with their
    output shape and pooled width, and the ``lastK`` range where the model has transformer blocks."""
    name = check_model_name(model)
    backbone = load_backbone(name, "none")
    rows = layer_table(backbone.model, backbone.preprocessing.input_size, depth)
    blocks, _ = transformer_blocks(backbone.model)
    return {"model": name, "input_size": backbone.preprocessing.input_size,
            "layers": [{"name": n, "shape": list(shape), "width": w} for n, shape, w in rows],
            "last_k": len(blocks)}
