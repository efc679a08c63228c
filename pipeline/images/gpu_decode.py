"""``--decode gpu`` (opt-in, CUDA): JPEGs decoded on the GPU, resized and cropped there.

Decoder processes then only read, hash and check headers, so a GPU is no longer held back by
how many JPEGs the CPU cores can decode. Two decoder libraries (``--gpu-decoder``), the one
used recorded in the cache:

* ``torchvision`` — ``torchvision.io.decode_jpeg(device="cuda")``: nvJPEG on the GPU.
* ``nvimgcodec`` — NVIDIA's nvImageCodec (``pip install -e '.[gpu]'``): nvJPEG's hardware
  decoder where the GPU has one (A100/H100/H200), else its CUDA decoder.

``auto`` takes torchvision's while torchvision has it: measured side by side on an H200
(bench/extract.py --device cuda, 500x375 photos) it decoded 21,300-23,300 img/s alone against
nvImageCodec's 19,200-20,500 (hardware decoder or not), and extraction with it was as fast or
faster (resnet50 fp32 3,024 vs 2,797 img/s). torchvision 0.29 marks its decoders deprecated;
where they are gone, ``auto`` takes nvImageCodec.

GPU decoders and GPU resampling round differently from libjpeg-turbo and PIL, so rows differ
slightly from the exact default: the mode is recorded in the cache and never mixed with exact
rows. Files the GPU path does not take (not JPEG, CMYK, no end-of-image marker, i.e. possibly
truncated) are decoded on the CPU as usual, and a file a GPU decoder refuses fails alone.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..choices import GPU_DECODERS
from ..errors import UsageError

JPEG_EOI = b"\xff\xd9"
INSTALL_GPU = "pip install -e '.[gpu]' (nvImageCodec for CUDA 13: nvidia-nvimgcodec-cu13, nvidia-nvjpeg)"


@dataclass
class Encoded:
    """A JPEG's bytes, to be decoded on the GPU."""

    data: torch.Tensor  # uint8 [n]


def plain_jpeg(data: bytes, max_pixels: int | None) -> bool:
    """Whether a GPU decoder can take this file as is: a complete baseline/progressive RGB or
    greyscale JPEG within the pixel limit (anything else goes the CPU way, with its checks)."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(JPEG_EOI):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            return img.format == "JPEG" and img.mode in ("RGB", "L") and (max_pixels is None or width * height <= max_pixels)
    except Exception:
        return False


Decoded = tuple[dict[int, torch.Tensor], dict[int, str]]  # {key: uint8 CHW RGB}, {key: why it failed}


class GpuJpegDecoder:
    """Decodes a batch of JPEGs to uint8 CHW RGB tensors on ``device``, on the current CUDA
    stream; one file's failure never fails the others."""

    name: str
    device: torch.device

    def decode(self, jpegs: dict[int, torch.Tensor]) -> Decoded:
        raise NotImplementedError


class TorchvisionDecoder(GpuJpegDecoder):
    """``torchvision.io.decode_jpeg`` on the device (nvJPEG on the SMs; on CPU, libjpeg-turbo)."""

    name = "torchvision"

    def __init__(self, device: torch.device):
        self.device = device

    def decode(self, jpegs: dict[int, torch.Tensor]) -> Decoded:
        from torchvision.io import ImageReadMode, decode_jpeg

        keys = list(jpegs)
        try:  # one batched call; if it fails, file by file, so one bad file fails alone
            images = decode_jpeg([jpegs[k] for k in keys], mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            return dict(zip(keys, images)), {}
        except RuntimeError:
            pass
        decoded, failed = {}, {}
        for k in keys:
            try:
                decoded[k] = decode_jpeg(jpegs[k], mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            except RuntimeError as exc:
                failed[k] = f"corrupt image: the GPU decoder refused it ({str(exc).splitlines()[0][:120]})"
        return decoded, failed


# nvImageCodec's optional codec extensions (JPEG 2000, TIFF) print these when their libraries are
# absent; featcache only asks it for JPEGs, so they are noise to a user
_NVIMGCODEC_NOISE = ("nvjpeg2k", "nvJPEG2000", "nvtiff", "nvTIFF", "nvidia-nvjpeg2k", "nvidia-nvtiff")


@contextmanager
def _native_stderr_filtered(noise: Sequence[str]) -> Iterator[None]:
    """Hide a native library's known noise written straight to file descriptor 2, passing
    every other line on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(n in line for n in noise):
                    print(line, file=sys.stderr)


# which nvImageCodec backends decode: "default" lets it pick (hardware decoder first where there
# is one); "hw" allows only the hardware decoder and its CUDA fallback (bench/extract.py compares them)
NVIMGCODEC_BACKENDS = "default"


class NvImageCodecDecoder(GpuJpegDecoder):
    """nvImageCodec: the hardware JPEG decoder where the GPU has one, else its CUDA decoder;
    decodes straight to planar RGB (CHW) on the device, on the caller's CUDA stream. On a CPU
    device (tests) it runs its CPU backend (libjpeg-turbo)."""

    name = "nvimgcodec"

    def __init__(self, device: torch.device):
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")  # errors only: a refused file is reported by us, per file
        with _native_stderr_filtered(_NVIMGCODEC_NOISE):
            from nvidia import nvimgcodec

            self.nv = nvimgcodec
            self.device = device
            if device.type == "cuda":
                backends = None if NVIMGCODEC_BACKENDS == "default" else [nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY), nvimgcodec.Backend(nvimgcodec.GPU_ONLY)]
                self.decoder = nvimgcodec.Decoder(device_id=device.index if device.index is not None else torch.cuda.current_device(), backends=backends)
            else:
                self.decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)])
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.SRGB, sample_format=nvimgcodec.P_RGB)

    def decode(self, jpegs: dict[int, torch.Tensor]) -> Decoded:
        keys = list(jpegs)
        streams = [self.nv.CodeStream(jpegs[k].numpy()) for k in keys]
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        images = self.decoder.decode(streams, params=self.params, cuda_stream=stream)
        decoded, failed = {}, {}
        for k, img in zip(keys, images):
            if img is None:
                failed[k] = "corrupt image: the GPU decoder (nvImageCodec) refused it"
            elif self.device.type == "cuda":
                decoded[k] = torch.as_tensor(img, device=self.device)  # __cuda_array_interface__: no copy; keeps img alive
            else:
                decoded[k] = torch.from_numpy(np.array(img.cpu()))
        return decoded, failed


def nvimgcodec_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


def torchvision_decodes_on_gpu() -> bool:
    import torchvision.io

    return hasattr(torchvision.io, "decode_jpeg")


def open_gpu_decoder(choice: str, device: torch.device) -> GpuJpegDecoder:
    """The decoder ``--gpu-decoder`` names; ``auto``: torchvision's while it exists (measured
    as fast or faster, see the module doc), else nvImageCodec."""
    if choice not in GPU_DECODERS:
        raise UsageError(f"--gpu-decoder {choice!r}: choose one of {', '.join(GPU_DECODERS)}")
    if choice == "auto":
        choice = "torchvision" if torchvision_decodes_on_gpu() or not nvimgcodec_installed() else "nvimgcodec"
    if choice == "nvimgcodec" and not nvimgcodec_installed():
        raise UsageError(f"--gpu-decoder nvimgcodec needs nvImageCodec: {INSTALL_GPU} (or --gpu-decoder auto)")
    if choice == "torchvision" and not torchvision_decodes_on_gpu():
        raise UsageError(f"--gpu-decoder torchvision: this torchvision has no JPEG decoder any more; {INSTALL_GPU} and use nvimgcodec")
    return TorchvisionDecoder(device) if choice == "torchvision" else NvImageCodecDecoder(device)


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
