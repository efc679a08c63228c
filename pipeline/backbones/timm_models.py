"""``timm:NAME`` backbones: timm's ~1,300 architectures, headless, with their own data config.

The embedding is timm's pooled pre-logits output (``forward_head(forward_features(x),
pre_logits=True)``): the model is created with ``num_classes=0``, so its forward returns
exactly that (width ``num_features``, or ``head_hidden_size`` where the head has a hidden
layer). Preprocessing comes from ``resolve_model_data_config`` — bicubic and a
``crop_pct``-derived resize for most models, never torchvision's 256/224 bilinear.

Weights follow the torchvision rules: ``DEFAULT`` (the name's pretrained tag, or timm's
default one), a pretrained tag (``--weights fb_in22k``), ``none`` (seeded random init) or a
state_dict PATH. Pretrained files are read from the local Hugging Face / torch hub cache
when present, downloaded when online, and otherwise refused with one line — never a silent
random init.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError
from .preprocessing import Preprocessing

PREFIX = "timm:"
EXTRA_HINT = "pip install -e '.[timm]'"


def import_timm():
    try:
        import timm
    except ImportError:
        raise BackboneError(f"timm: backbones need the timm package: {EXTRA_HINT}") from None
    return timm


def check_name(name: str) -> str:
    """``timm:ARCH`` or ``timm:ARCH.TAG`` as timm spells it, or a BackboneError with close names."""
    arch = name[len(PREFIX):].strip()
    if ":" in arch or "/" in arch:  # timm would fetch it (hf-hub:, local-dir:): a config and weights from outside its registry
        raise BackboneError(f"--model {name!r} names a model outside timm's installed registry; featcache builds registry names only: "
                            "use timm:ARCH (see `featcache models --source timm`) with --weights PATH for a downloaded state_dict")
    timm = import_timm()
    base, _, tag = arch.partition(".")
    if not timm.is_model(base.lower()):
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else "see `featcache models --source timm --filter WORD`"
        raise BackboneError(f"unknown timm model {base!r}: {hint}")
    return PREFIX + base.lower() + (f".{tag}" if tag else "")


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The model's own data config as our ``Preprocessing`` (refusing the crop modes it cannot express)."""
    timm = import_timm()
    cfg = timm.data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    if height != width:
        raise BackboneError(f"{type(model).__name__} takes {height}x{width} inputs; only square inputs are supported")
    if mode == "center":
        resize = [math.floor(height / crop_pct)]
    elif mode == "squash":
        resize = [math.floor(height / crop_pct)] * 2
    else:
        raise BackboneError(f"timm crop_mode {mode!r} (letterbox padding) is not supported; only center and squash are")
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"  # timm maps 'random' and the like to bicubic at eval time
    return Preprocessing(resize_size=resize, crop_size=[height], mean=[float(x) for x in cfg["mean"]], std=[float(x) for x in cfg["std"]],
                         interpolation=interpolation, source="timm data config")


def _online(host: str = "huggingface.co") -> bool:
    """Whether the weights host resolves; offline machines fail this at once, where a download
    would retry for most of a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _cached_file(cfg: dict[str, Any]) -> str | None:
    """The pretrained file of ``cfg`` in the local Hugging Face or torch hub cache, if there."""
    hf_id = cfg.get("hf_hub_id")
    if hf_id:
        from huggingface_hub import hf_hub_download

        for filename in filter(None, (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin")):
            try:
                return hf_hub_download(hf_id, filename, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached (or not that file name)
                continue
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _where(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return f"Hugging Face cache {constants.HF_HUB_CACHE} (repo {cfg['hf_hub_id']})"
    return f"torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'}"


def pretrained_tags(base: str) -> list[str]:
    timm = import_timm()
    return sorted(n.partition(".")[2] for n in timm.list_pretrained(base + ".*"))


def _create_pretrained(full_name: str) -> tuple[nn.Module, str]:
    """timm's model with pretrained weights (from the local cache, else downloaded), headless."""
    timm = import_timm()
    base, _, tag = full_name.partition(".")
    tags = pretrained_tags(base)
    if not tags:
        raise BackboneError(f"timm model {base!r} has no pretrained weights; use --weights none or --weights PATH")
    if tag and tag not in tags:
        raise BackboneError(f"--weights {tag!r} is not a pretrained tag of timm:{base} (choices: DEFAULT, {', '.join(tags)}, none, PATH)")
    cfg = timm.models.get_pretrained_cfg(full_name).to_dict()
    resolved = f"{base}.{tag or cfg.get('tag') or tags[0]}"
    local = _cached_file(cfg)
    if local is None and not _online():
        raise WeightsUnavailableError(
            f"pretrained weights timm:{resolved} are not in the local {_where(cfg)} and this machine is offline; "
            "go online once (or copy the file there), or use --weights none (random init) or --weights PATH")
    overlay = {"file": local} if local else None
    try:
        model = timm.create_model(full_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - download errors, hash mismatches, unpickling
        first_line = (str(exc).splitlines() or [""])[0][:120]
        raise WeightsUnavailableError(f"pretrained weights timm:{resolved} could not be loaded ({type(exc).__name__}: {first_line}); "
                                      f"check the {_where(cfg)}, or use --weights none or --weights PATH") from exc
    return model, f"timm:{resolved}"


def build(name: str, weights: str, seed: int) -> tuple[nn.Module, Preprocessing, str, int | None, str | None]:
    """(headless model, preprocessing, weights id, seed used, state_dict path or None) for
    ``timm:ARCH[.TAG]`` and a weights spec; the caller loads a state_dict PATH into it."""
    timm = import_timm()
    arch = name[len(PREFIX):]
    base, _, name_tag = arch.partition(".")
    spec = str(weights)
    if spec.lower() == "none" or _is_path(spec):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        return model, preprocessing_of(model), "none", seed, (None if spec.lower() == "none" else spec)
    # timm's tags are lower-case (the options upper-case torchvision-style names); "arch.tag" is accepted too
    tag = name_tag if spec.upper() == "DEFAULT" else spec.lower().removeprefix(base + ".")
    if name_tag and spec.upper() != "DEFAULT" and tag != name_tag:
        raise BackboneError(f"--model {name} already names the tag {name_tag!r}; drop it or --weights {spec}")
    model, weights_id = _create_pretrained(f"{base}.{tag}" if tag else base)
    return model, preprocessing_of(model), weights_id, None, None


def classifier_name(model: nn.Module) -> str:
    """The dotted name of the classification layer in timm's checkpoints (``head.fc``, ``fc``…)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "")
    return name if isinstance(name, str) else name[0]


def _is_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(spec).expanduser().is_file()


def list_models(pattern: str = "") -> list[str]:
    timm = import_timm()
    return ["timm:" + n for n in timm.list_models(f"*{pattern}*" if pattern else "")]
