"""Features from any layer, in the same forward: ``--layer layer3 --layer layer4 --layer last4``.

Which layer transfers best is the first question on out-of-domain data. A tapped backbone is
the model truncated after its deepest tap (torch.fx, as torchvision's
``create_feature_extractor`` — timm's wrapper of it for timm models) plus pooling, returning
every tap's pooled vector side by side in one tensor ``[N, sum of widths]``: engines
(compiled, ONNX, OpenVINO) run it like any backbone, and extraction splits the columns into
one cache per layer.

Pooling: a feature map ``[N, C, H, W]`` is averaged over H and W; a token sequence
``[N, T, C]`` gives its class token (``cls``) or the class token and the mean of the patch
tokens (``cls+mean``); ``lastK`` follows DINOv2's linear evaluation: the class tokens of the
last K transformer blocks after the final norm, concatenated (``cls+mean`` appends the mean
patch token of the last block).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..choices import TOKEN_POOLS
from ..errors import BackboneError

_LAST = re.compile(r"^last(\d+)$")
# (block list, final norm) of the transformer families we know: timm ViT/DeiT/EVA/DINOv2, torchvision ViT
_BLOCK_LISTS = (("blocks", "norm"), ("encoder.layers", "encoder.ln"))


@dataclass(frozen=True)
class Tap:
    """One requested layer: the graph nodes it reads and how it pools them."""

    name: str  # as the user wrote it: "layer3", "blocks.11", "last4"
    nodes: tuple[str, ...]
    last_k: bool = False


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def transformer_blocks(model: nn.Module) -> tuple[list[str], str | None]:
    """Dotted names of the model's transformer blocks, in order, and its final norm ('' if none)."""
    modules = _modules(model)
    for blocks, norm in _BLOCK_LISTS:
        container = modules.get(blocks)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return [f"{blocks}.{n}" for n, _ in container.named_children()], (norm if norm in modules else None)
    return [], None


def resolve(model: nn.Module, specs: list[str], model_name: str) -> tuple[list[Tap], str | None]:
    """The taps ``specs`` ask for (checked against the model's modules) and the final norm lastK uses."""
    modules = _modules(model)
    blocks, norm = transformer_blocks(model)
    taps: list[Tap] = []
    for spec in specs:
        spec = spec.strip()
        match = _LAST.match(spec.lower())
        if match:
            k = int(match.group(1))
            if not blocks:
                raise BackboneError(f"--layer {spec}: {model_name} has no transformer block list (timm ViT/DeiT/EVA/DINOv2 'blocks', torchvision "
                                    f"vit 'encoder.layers'); tap named layers instead (see `featcache models --layers {model_name}`)")
            if not 1 <= k <= len(blocks):
                raise BackboneError(f"--layer {spec}: {model_name} has {len(blocks)} blocks; choose last1 … last{len(blocks)}")
            taps.append(Tap(spec.lower(), tuple(blocks[-k:]), last_k=True))
        elif spec in modules and spec:
            taps.append(Tap(spec, (spec,)))
        else:
            close = difflib.get_close_matches(spec, [n for n in modules if n], n=4, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"see `featcache models --layers {model_name}`"
            raise BackboneError(f"--layer {spec!r} is not a module of {model_name}: {hint}")
    if len({t.name for t in taps}) != len(taps):
        raise BackboneError(f"--layer names the same layer twice ({', '.join(specs)})")
    return taps, norm


def _extractor(model: nn.Module, nodes: list[str]) -> nn.Module:
    """``model`` truncated after ``nodes``, returning ``{node: tensor}`` (torch.fx)."""
    if type(model).__module__.startswith("timm."):
        from timm.layers import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    try:
        return create_feature_extractor(model, return_nodes={n: n for n in nodes})
    except Exception as exc:  # noqa: BLE001 - torch.fx cannot trace data-dependent Python
        raise BackboneError(f"cannot tap layers of {type(model).__name__}: torch.fx cannot trace it ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:140] if str(exc) else ''}); extract its final embedding without --layer") from None


class LayerTaps(nn.Module):
    """The truncated backbone and the pooling of each tap; forward returns ``[N, sum widths]``."""

    def __init__(self, extractor: nn.Module, taps: list[Tap], norm: nn.Module | None, token_pool: str, prefix_tokens: int):
        super().__init__()
        self.extractor = extractor
        self.norm = norm if norm is not None else nn.Identity()
        self.taps = taps
        self.token_pool = token_pool
        self.prefix_tokens = prefix_tokens

    def _tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [x[:, 0]]
        if self.token_pool == "cls+mean":
            out.append(x[:, self.prefix_tokens:].mean(1))
        return out

    def _pool(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim == 4:
            return [x.mean((-2, -1))]
        if x.ndim == 3:
            return self._tokens(x)
        return [x.flatten(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.extractor(x)
        out: list[torch.Tensor] = []
        for tap in self.taps:
            if tap.last_k:
                normed = [self.norm(feats[n]) for n in tap.nodes]
                out.extend(t[:, 0] for t in normed)
                if self.token_pool == "cls+mean":
                    out.append(normed[-1][:, self.prefix_tokens:].mean(1))
            else:
                out.extend(self._pool(feats[tap.nodes[0]]))
        return torch.cat(out, 1)


def tap_model(model: nn.Module, specs: list[str], token_pool: str, input_size: int, model_name: str) -> tuple[LayerTaps, list[tuple[str, int, str]]]:
    """(tapped model, (name, pooled width, pooling) of each tap)."""
    if token_pool not in TOKEN_POOLS:
        raise BackboneError(f"--token-pool {token_pool!r}: choose one of {', '.join(TOKEN_POOLS)}")
    taps, norm_name = resolve(model, specs, model_name)
    nodes = list(dict.fromkeys(n for t in taps for n in t.nodes))
    norm = _modules(model)[norm_name] if norm_name else None
    prefix = int(getattr(model, "num_prefix_tokens", 1) or 1)
    wrapped = LayerTaps(_extractor(model, nodes), taps, norm, token_pool, prefix).eval()
    dims, pools = [], []
    with torch.inference_mode():
        feats = wrapped.extractor(torch.zeros(1, 3, input_size, input_size))
    for tap in taps:
        shape = feats[tap.nodes[0]].shape
        if tap.last_k:
            dims.append(shape[-1] * (len(tap.nodes) + (token_pool == "cls+mean")))
            pools.append(f"class tokens of the last {len(tap.nodes)} blocks after the final norm" + (" + mean patch token" if token_pool == "cls+mean" else ""))
        elif len(shape) == 4:
            dims.append(shape[1])
            pools.append("avg")
        elif len(shape) == 3:
            dims.append(shape[-1] * (2 if token_pool == "cls+mean" else 1))
            pools.append(token_pool)
        else:
            dims.append(math.prod(shape[1:]))
            pools.append("flatten")
    return wrapped, [(t.name, d, p) for t, d, p in zip(taps, dims, pools)]


def layer_table(model: nn.Module, input_size: int, depth: int = 2) -> list[tuple[str, tuple[int, ...], int]]:
    """(module name, output shape, pooled width) of every module up to ``depth`` dots deep,
    in forward order: what ``--layer`` can tap."""
    seen: list[tuple[str, tuple[int, ...], int]] = []
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim >= 2:
                    width = out.shape[1] if out.ndim == 4 else out.shape[-1] if out.ndim == 3 else math.prod(out.shape[1:])
                    seen.append((name, tuple(out.shape[1:]), int(width)))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    return seen
