"""What turns an image into a model's input, from the weights' or the model's own config.

One record (``Preprocessing``) for every source: torchvision presets (resize 256 / crop 224,
bilinear), timm data configs (bicubic, ``crop_pct``-derived resize, ``squash`` crops) and
Cadene's ``pretrainedmodels`` settings (BGR channel order, 0–255 range). It is split into a
geometric half (``pixels``: resize + centre crop to uint8, done by decoder processes) and a
numeric half (``normalize``: on the engine's device), and their composition is the exact
transform (``transform``) that predict and the fine-tune use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

# Fields added after caches were first written: left out of ``to_dict`` at their default, so
# the recorded preprocessing of every existing torchvision cache stays what it was.
_LATER_FIELDS = {"input_space": "RGB", "input_range": 1.0}


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a PIL image into the model's input tensor (recorded in caches).

    ``resize_size`` of one value resizes the shorter side (aspect kept); two values resize
    to exactly that height and width (timm's ``squash`` crop mode).
    """

    resize_size: list[int]
    crop_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    antialias: bool = True
    source: str = "weights"  # where it came from: "weights", "timm data config", "fallback", …
    input_space: str = "RGB"  # "BGR": channels reversed before normalising (some pretrainedmodels)
    input_range: float = 1.0  # 255.0: pixel values 0–255 before normalising (some pretrainedmodels)

    @classmethod
    def from_torchvision(cls, transform: ImageClassification, source: str = "weights") -> Preprocessing:
        return cls(
            resize_size=list(transform.resize_size),
            crop_size=list(transform.crop_size),
            mean=[float(m) for m in transform.mean],
            std=[float(s) for s in transform.std],
            interpolation=InterpolationMode(transform.interpolation).value,
            antialias=bool(transform.antialias),
            source=source,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    def transform(self) -> ModelTransform:
        """The exact transform: PIL image (or uint8 tensor) in, the model's input tensor out."""
        return ModelTransform(self.pixels(), self)

    def pixels(self) -> ToPixels:
        """The geometric half of ``transform()``: resize and centre crop to a uint8 CHW tensor,
        four times smaller than floats to pass from decoder processes and to a GPU."""
        # F.resize reads one size as the shorter side and two as (height, width), as recorded
        return ToPixels(list(self.resize_size), list(self.crop_size), InterpolationMode(self.interpolation), self.antialias)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The numeric half of ``transform()`` on uint8 pixels (one image or a batch), on
        whatever device they live: to [0, 1] floats (× 255 for 0–255 models), channels
        reversed for BGR models, then (x − mean) / std."""
        x = F.convert_image_dtype(pixels, torch.float)
        if self.input_range != 1.0:
            x = x * self.input_range
        if self.input_space == "BGR":
            x = x.flip(-3)
        return F.normalize(x, mean=list(self.mean), std=list(self.std))

    @property
    def input_size(self) -> int:
        return int(self.crop_size[0])

    @property
    def draft_size(self) -> int:
        """The smallest side a draft-decoded JPEG may have: the resize's target, so the
        resize still only shrinks."""
        return int(max(self.resize_size))


@dataclass(frozen=True)
class ToPixels:
    """resize -> centre crop -> uint8 tensor, exactly as torchvision's preset does them."""

    resize_size: list[int]
    crop_size: list[int]
    interpolation: InterpolationMode
    antialias: bool

    def __call__(self, img) -> torch.Tensor:
        img = F.resize(img, self.resize_size, interpolation=self.interpolation, antialias=self.antialias)
        img = F.center_crop(img, self.crop_size)
        return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)


@dataclass(frozen=True)
class ModelTransform:
    """``normalize(pixels(img))`` as one picklable callable (for DataLoader workers); for RGB
    0–1 models it equals torchvision's ``ImageClassification`` preset bit for bit."""

    pixels: ToPixels
    preprocessing: Preprocessing

    def __call__(self, img) -> torch.Tensor:
        return self.preprocessing.normalize(self.pixels(img))
