"""``pretrainedmodels:NAME`` backbones: Cadene's package, which classic recipes use
(``pretrainedmodels.__dict__['se_resnet50']``).

The embedding is the input of ``last_linear`` (replaced by Identity). Preprocessing comes from
its ``pretrained_settings``: input size, mean/std, and its input space and range — several of
its models (bninception, the caffe ports) expect BGR channels and 0–255 values, which
``Preprocessing`` honours and records. Resize follows its own ``TransformImage``: shorter
side to floor(size / 0.875), bilinear, centre crop. Many of these weights live on in timm
under other names (``legacy_seresnet50`` carries ``se_resnet50``'s weights).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError
from .preprocessing import Preprocessing

PREFIX = "pretrainedmodels:"
TIMM_PORTS = {"se_resnet50": "legacy_seresnet50", "se_resnet101": "legacy_seresnet101", "se_resnet152": "legacy_seresnet152",
              "se_resnext50_32x4d": "legacy_seresnext50_32x4d", "se_resnext101_32x4d": "legacy_seresnext101_32x4d", "senet154": "legacy_senet154",
              "inceptionv4": "inception_v4", "inceptionresnetv2": "inception_resnet_v2", "xception": "legacy_xception", "dpn68": "dpn68",
              "dpn92": "dpn92", "dpn98": "dpn98", "dpn131": "dpn131", "nasnetalarge": "nasnetalarge", "pnasnet5large": "pnasnet5large"}


def _import():
    try:
        import pretrainedmodels
    except ImportError as exc:
        raise BackboneError(f"pretrainedmodels: backbones need the pretrainedmodels package ({exc}): pip install -e '.[pretrainedmodels]'; "
                            "or use timm's ports of the same weights (e.g. timm:legacy_seresnet50 for se_resnet50)") from None
    return pretrainedmodels


def check_name(name: str) -> str:
    pm = _import()
    arch = name[len(PREFIX):].strip().lower()
    if arch not in pm.model_names:
        port = TIMM_PORTS.get(arch)
        hint = f"; timm carries it as timm:{port}" if port else f" (choices: {', '.join(sorted(pm.model_names))})"
        raise BackboneError(f"unknown pretrainedmodels model {arch!r}{hint}")
    return PREFIX + arch


def _settings(arch: str, dataset: str | None) -> tuple[str, dict]:
    pm = _import()
    table = pm.pretrained_settings[arch]
    key = dataset or ("imagenet" if "imagenet" in table else next(iter(table)))
    if key not in table:
        raise BackboneError(f"--weights {dataset!r} is not a weights name of pretrainedmodels:{arch} (choices: DEFAULT, {', '.join(table)}, none, PATH)")
    return key, table[key]


def preprocessing_of(settings: dict) -> Preprocessing:
    size = int(settings["input_size"][-1])
    top = float(max(settings["input_range"]))
    return Preprocessing(resize_size=[math.floor(size / 0.875)], crop_size=[size], mean=[float(x) for x in settings["mean"]],
                         std=[float(x) for x in settings["std"]], interpolation="bilinear", source="pretrainedmodels settings",
                         input_space=str(settings.get("input_space", "RGB")).upper(), input_range=255.0 if top > 1 else 1.0)


def build(name: str, weights: str, seed: int) -> tuple[nn.Module, Preprocessing, str, int | None, str | None]:
    """(headless model, preprocessing, weights id, seed used, state_dict path or None)."""
    pm = _import()
    arch = name[len(PREFIX):]
    spec = str(weights)
    is_path = spec.lower() not in ("none", "default") and (os.sep in spec or spec.endswith((".pt", ".pth")) or Path(spec).is_file())
    if spec.lower() == "none" or is_path:
        key, settings = _settings(arch, None)
        torch.manual_seed(seed)
        model = pm.__dict__[arch](num_classes=settings["num_classes"], pretrained=None)
        weights_id, used_seed = "none", seed
    else:
        key, settings = _settings(arch, None if spec.upper() == "DEFAULT" else spec.lower())
        filename = os.path.basename(settings["url"])
        expected = Path(torch.hub.get_dir()) / "checkpoints" / filename
        try:
            model = pm.__dict__[arch](num_classes=settings["num_classes"], pretrained=key)
        except Exception as exc:  # noqa: BLE001 - URLError, OSError, hash mismatch
            first_line = (str(exc).splitlines() or [""])[0][:120]
            raise WeightsUnavailableError(
                f"pretrained weights pretrainedmodels:{arch}.{key} are not in the local cache ({expected}) and could not be downloaded "
                f"({type(exc).__name__}: {first_line}); go online once or copy {filename} there, or use --weights none or --weights PATH") from exc
        weights_id, used_seed = f"pretrainedmodels:{arch}.{key}", None
    if not isinstance(getattr(model, "last_linear", None), nn.Module):
        raise BackboneError(f"pretrainedmodels:{arch} has no last_linear layer to replace")
    model.last_linear = nn.Identity()
    return model, preprocessing_of(settings), weights_id, used_seed, (spec if is_path else None)


def list_models(pattern: str = "") -> list[str]:
    pm = _import()
    return [PREFIX + n for n in sorted(pm.model_names) if pattern.lower() in n]
