"""``--decode gpu`` (opt-in, CUDA): JPEGs decoded by nvJPEG on the GPU, resized and cropped there.

Decoder processes then only read, hash and check headers, so a GPU is no longer held back by
how many JPEGs the CPU cores can decode. nvJPEG and GPU resampling round differently from
libjpeg-turbo and PIL, so rows differ slightly from the exact default: the mode is recorded
in the cache and never mixed with exact rows. Files the GPU path does not take (not JPEG,
CMYK, no end-of-image marker, i.e. possibly truncated) are decoded on the CPU as usual.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image

from ..errors import UsageError

JPEG_EOI = b"\xff\xd9"


@dataclass
class Encoded:
    """A JPEG's bytes, to be decoded on the GPU."""

    data: torch.Tensor  # uint8 [n]


def plain_jpeg(data: bytes, max_pixels: int | None) -> bool:
    """Whether nvJPEG can take this file as is: a complete baseline/progressive RGB or
    greyscale JPEG within the pixel limit (anything else goes the CPU way, with its checks)."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(JPEG_EOI):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            return img.format == "JPEG" and img.mode in ("RGB", "L") and (max_pixels is None or width * height <= max_pixels)
    except Exception:
        return False


def decode_on_gpu(encoded: dict[int, torch.Tensor], device: torch.device) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """{position: uint8 CHW RGB tensor on ``device``}, {position: reason} for those nvJPEG refused.
    One batched call; if it fails, file by file, so one bad file fails alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    keys = list(encoded)
    try:
        images = decode_jpeg([encoded[k] for k in keys], mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return dict(zip(keys, images)), {}
    except RuntimeError:
        pass
    decoded, failed = {}, {}
    for k in keys:
        try:
            decoded[k] = decode_jpeg(encoded[k], mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError as exc:
            failed[k] = f"corrupt image: the GPU decoder refused it ({str(exc).splitlines()[0][:120]})"
    return decoded, failed


def pixels_on_gpu(decoded: dict[int, torch.Tensor], positions: Sequence[int], to_pixels: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Resize and crop the decoded images with the backbone's own preprocessing, on the GPU:
    one call per distinct image size (a camera's photos share one), in ``positions`` order."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, p in enumerate(positions):
        by_size.setdefault(tuple(decoded[p].shape), []).append(k)
    out: list[torch.Tensor | None] = [None] * len(positions)
    for ks in by_size.values():
        for k, pixels in zip(ks, to_pixels(torch.stack([decoded[positions[k]] for k in ks]))):
            out[k] = pixels
    return torch.stack(out)


def check_gpu_decode(device: torch.device) -> None:
    if device.type != "cuda":
        raise UsageError("--decode gpu needs a CUDA device (nvJPEG); on CPU use exact (the default) or draft")
