"""What trains during fine-tuning: BatchNorm frozen for real, and which backbone blocks thaw.

Frozen BatchNorm means two things, and both are needed: the layer stays in eval mode (so
its running mean/var are never updated by training batches) and its affine weight/bias
get no gradient (so the optimiser never touches them). We select BatchNorm layers by
*module type* and take their parameters from the module itself — never by zipping
``modules()`` with ``parameters()``, whose orders do not correspond (the classic
tutorial bug that freezes the wrong tensors).

Keeping the original BatchNorm modules (rather than swapping in torchvision's
``FrozenBatchNorm2d``) leaves the architecture and state_dict keys unchanged, so a
fine-tuned backbone loads into a stock torchvision model for re-extraction.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones import AUX_CLASSIFIERS
from ..errors import UsageError

Block = tuple[str, list[tuple[str, nn.Parameter]]]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm(model: nn.Module) -> int:
    """No gradients for BatchNorm affine parameters and eval mode now; returns how many layers.

    Call :func:`keep_frozen_in_eval` after every ``model.train()`` (``FineTuneModel`` does).
    """
    layers = batchnorm_layers(model)
    for _, bn in layers:
        bn.eval()
        for p in bn.parameters(recurse=False):
            p.requires_grad_(False)
    return len(layers)


def keep_frozen_in_eval(modules: list[nn.Module]) -> None:
    for m in modules:
        m.eval()


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _expands(module: nn.Module, depth: int) -> bool:
    """Plain containers are split into their children (not subclasses such as
    ``Conv2dNormActivation``, which are one layer); so is a top-level module whose
    parameters (over 90%) live in one plain container (a ViT ``Encoder`` and its ``layers``)."""
    if type(module) in _CONTAINERS:
        return True
    if depth != 1:
        return False
    total = sum(p.numel() for p in module.parameters())
    return any(type(c) in _CONTAINERS and sum(p.numel() for p in c.parameters()) > 0.9 * total for c in module.children())


def backbone_blocks(model: nn.Module) -> list[Block]:
    """The backbone as an ordered list of trainable blocks (input side first).

    resnet: conv1, layer1.0 … layer4.1; densenet: features.conv0, features.denseblock1.denselayer1 …;
    efficientnet: features.0, features.1.0 (one MBConv) …; vit: class_token, conv_proj,
    encoder.pos_embedding, encoder.layers.encoder_layer_0 …, encoder.ln. A block is named
    by its module, or by the parameter for loose parameters. Blocks whose only parameters
    are BatchNorm's (always frozen) and auxiliary classifiers are left out.
    """
    bn_params = {id(p) for _, bn in batchnorm_layers(model) for p in bn.parameters(recurse=False)}
    blocks: list[Block] = []

    def visit(prefix: str, module: nn.Module, depth: int) -> None:
        if depth == 0 or _expands(module, depth):
            for n, p in module.named_parameters(recurse=False):  # loose parameters: one block each
                name = f"{prefix}.{n}" if prefix else n
                blocks.append((name, [(name, p)]))
            for name, child in module.named_children():
                if depth == 0 and name in AUX_CLASSIFIERS:
                    continue
                visit(f"{prefix}.{name}" if prefix else name, child, depth + 1)
            return
        params = [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if id(p) not in bn_params]
        if params:
            blocks.append((prefix, params))

    visit("", model, 0)
    return blocks


def parse_unfreeze(spec: str) -> int | None:
    """``all`` -> None (every block); ``last:N`` -> N (0 trains only the head)."""
    if spec == "all":
        return None
    kind, _, count = spec.partition(":")
    if kind == "last" and count.isdigit():
        return int(count)
    raise UsageError(f"--unfreeze {spec!r}: use 'all' or 'last:N' (the last N backbone blocks; last:0 trains only the head)")


def unfreeze(model: nn.Module, spec: str) -> tuple[list[str], list[nn.Module]]:
    """Make the chosen blocks trainable (BatchNorm stays frozen).

    Returns (names of trainable blocks, modules to keep in eval mode: every BatchNorm layer
    plus every frozen block, so dropout in a frozen block behaves as at extraction).
    """
    count = parse_unfreeze(spec)
    blocks = backbone_blocks(model)
    if count is not None and count > len(blocks):
        raise UsageError(f"--unfreeze {spec!r}: the backbone has only {len(blocks)} blocks (last is {blocks[-1][0]!r}); use a smaller N or 'all'")
    chosen = blocks if count is None else (blocks[len(blocks) - count :] if count else [])
    model.requires_grad_(False)
    for _, params in chosen:
        for _, p in params:
            p.requires_grad_(True)
    freeze_batchnorm(model)
    chosen_names = {name for name, _ in chosen}
    frozen_modules: list[nn.Module] = [bn for _, bn in batchnorm_layers(model)]
    module_names = {n for n, _ in model.named_modules()}
    for name, _ in blocks:
        if name not in chosen_names and name in module_names:  # loose parameters have no mode
            frozen_modules.append(model.get_submodule(name))
    return [name for name, _ in chosen], frozen_modules
