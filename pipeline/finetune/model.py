"""The model stage 3 trains: the headless backbone with the stage-2 head attached (logreg
as the equivalent standardise + linear layer), the chosen blocks thawed, BatchNorm frozen."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, drop_aux_classifiers
from ..errors import IncompatibleError
from ..heads import LoadedHead, LogRegHead, TorchHead, build_head_module
from .freezing import freeze_batchnorm, keep_frozen_in_eval, unfreeze

# ----------------------------------------------------------------------------- model


class FineTuneModel(nn.Module):
    """Headless backbone -> stage-2 head module (``Standardize`` first, as fitted on the cache).

    ``train()`` keeps every BatchNorm layer and every frozen block in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_in_eval: list[nn.Module] = []

    def forward(self, x: torch.Tensor):
        out = self.backbone(x)
        aux = None
        if isinstance(out, tuple):  # inception_v3 in training mode: (features, aux logits)
            out, aux = out[0], out[1]
        logits = self.head(torch.flatten(out, 1))
        return (logits, aux) if aux is not None and self.training else logits

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.frozen_in_eval)
        return self


def head_module_from(loaded: LoadedHead, n_classes: int, fresh: bool, seed: int) -> tuple[str, dict[str, Any], nn.Sequential]:
    """(kind, params, module) to attach: the artifact's head as a torch module, or a fresh
    linear layer that keeps the artifact's standardisation (data statistics, not learned)."""
    head = loaded.head
    if loaded.kind == "knn":
        raise IncompatibleError(f"head {str(loaded.path)!r} is a kNN head: it has no weights to fine-tune; fit a logreg, linear or mlp head "
                                "on the same cache and fine-tune from that one")
    classes = [int(c) for c in np.asarray(head.classes_)]
    if classes != list(range(n_classes)):
        missing = sorted(set(range(n_classes)) - set(classes))
        names = [loaded.provenance["classes"][i] for i in missing]
        raise IncompatibleError(f"head {str(loaded.path)!r} never saw class(es) {names} in training; refit it on data with every class, or pass --head new")
    dim = int(head.n_features_in_)
    if isinstance(head, LogRegHead):
        mean, scale, weight, bias = head.as_linear()
        kind, params, module = "linear", {}, build_head_module(dim, n_classes, (), ())
        module[1].weight.data.copy_(torch.as_tensor(weight, dtype=torch.float32))
        module[1].bias.data.copy_(torch.as_tensor(bias, dtype=torch.float32))
        module[0].mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        module[0].scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    elif isinstance(head, TorchHead):
        kind, params = loaded.kind, {"hidden": tuple(head.hidden), "dropout": tuple(head.dropout)}
        module = copy.deepcopy(head.module_).cpu()
    else:
        raise IncompatibleError(f"head {str(loaded.path)!r} of kind {loaded.kind!r} cannot be fine-tuned")
    if fresh:
        torch.manual_seed(seed)
        standardize = module[0]
        kind, params, module = "linear", {}, build_head_module(dim, n_classes, (), ())
        module[0].load_state_dict(standardize.state_dict())
    return kind, params, module


def assemble(backbone: Backbone, head: nn.Module, unfreeze_spec: str, n_classes: int, seed: int) -> tuple[FineTuneModel, list[str], bool]:
    """Backbone + head, chosen blocks thawed, BatchNorm frozen. Returns (model, thawed
    blocks, whether inception's auxiliary classifier is trained)."""
    net = backbone.model
    thawed, frozen = unfreeze(net, unfreeze_spec)
    aux = getattr(net, "AuxLogits", None) is not None and bool(thawed)
    if aux:  # inception_v3: a fresh auxiliary classifier for our classes, trained with the backbone
        torch.manual_seed(seed)
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, n_classes)
        net.AuxLogits.requires_grad_(True)
        freeze_batchnorm(net.AuxLogits)
    else:
        drop_aux_classifiers(net)  # googlenet's 1000-way aux heads; inception's when nothing thaws
    model = FineTuneModel(net, head)
    model.frozen_in_eval = frozen
    head.requires_grad_(True)
    return model, thawed, aux
