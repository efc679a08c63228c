"""Bytes in, RGB images out: EXIF orientation, CMYK, 16-bit, palette and alpha all become
8-bit RGB; decompression bombs are refused; draft mode decodes large JPEGs at a reduced DCT
scale. Decoding never substitutes another file for a bad one: it raises
:class:`DecodeError` with a short reason, which the caller records."""
from __future__ import annotations

import io
import os
import re
import threading

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# ----------------------------------------------------------------------------- decoding


class DecodeError(Exception):
    """A file that cannot become an RGB image; ``str(err)`` is the recorded reason."""


DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


# open shards of this process, by (path, mtime as scanned): one pread per member instead of an
# open, seek, read and close per image; a shard rewritten since (another mtime) is opened anew
_SHARD_FDS: dict[tuple[str, int], int] = {}
_MAX_SHARD_FDS = 8


def _shard_fd(path: str, mtime_ns: int) -> int:
    fd = _SHARD_FDS.get((path, mtime_ns))
    if fd is None:
        if len(_SHARD_FDS) >= _MAX_SHARD_FDS:  # members come shard by shard: the oldest is done
            os.close(_SHARD_FDS.pop(next(iter(_SHARD_FDS))))
        fd = _SHARD_FDS[(path, mtime_ns)] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    return fd


def read_member(path: str | os.PathLike, offset: int, size: int, mtime_ns: int = 0) -> bytes:
    """A tar member's bytes, read in place from its shard (kept open between members)."""
    try:
        data = os.pread(_shard_fd(str(path), mtime_ns), size, offset)
    except FileNotFoundError:
        raise DecodeError("its shard vanished during the run")
    except OSError as exc:
        raise DecodeError(f"cannot read its shard: {exc.strerror or exc}")
    if len(data) != size:
        raise DecodeError(f"truncated shard: the member needs {size} bytes, {len(data)} are left")
    return data


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except PermissionError:
        raise DecodeError("permission denied")
    except FileNotFoundError:
        raise DecodeError("file vanished during the run")
    except IsADirectoryError:
        raise DecodeError("is a folder, not a file")
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc.strerror or exc}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit/float scaled, alpha composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        if mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0:
            arr = arr / 257.0  # 16-bit full range to 8-bit
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


_BOMB = re.compile(r"^decompression bomb: .*(?:over --max-pixels|exceeds the limit of) (\d+)")


def bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return f"decompression bomb: {width}x{height} = {width * height:,} pixels, over --max-pixels {max_pixels}; raise --max-pixels to accept it"


def retry_under(reason: str, max_pixels: int | None) -> bool:
    """Whether a recorded failure should be decoded again under this ``--max-pixels``: a
    file refused as too large under a lower limit is retried when the limit is raised
    (other failures wait for the file to change)."""
    match = _BOMB.match(reason)
    return bool(match) and (max_pixels is None or max_pixels > int(match.group(1)))


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` fully into an upright RGB image, or raise :class:`DecodeError`. Safe to
    call from several threads at once (``serve`` decodes in a pool).

    ``draft_size`` (opt-in, changes pixels): a JPEG is decoded at the smallest 1/2, 1/4 or 1/8
    scale whose both sides are still at least ``draft_size`` — several times faster on large
    photos, since the DCT skips what the resize would throw away."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = _open_unlimited(data)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise DecodeError(bomb_reason(width, height, max_pixels))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # force the full decode here, so truncation is caught now
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}; raise --max-pixels to accept it")
    except UnidentifiedImageError:
        raise DecodeError("not an image (cannot identify image format)")
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise DecodeError("truncated image file")
        raise DecodeError(f"corrupt image: {msg}")
    except (ValueError, SyntaxError, TypeError, IndexError, MemoryError, EOFError) as exc:
        raise DecodeError(f"corrupt image: {type(exc).__name__}: {exc}")


_OPENING = threading.Lock()


def _open_unlimited(data: bytes) -> Image.Image:
    """``Image.open`` (the header only) with PIL's own bomb limit off, since ``decode_image``
    checks the size itself with one message for every limit. That limit is a global, so it is
    lifted under a lock for the header read alone; the decode runs outside it, in parallel."""
    with _OPENING:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, member: tuple[str, int, int] | None = None) -> Image.Image:
    """Read and decode one file, or a tar member given as (shard, offset, size) (see :func:`decode_image`)."""
    return decode_image(read_member(*member) if member else read_bytes(path), max_pixels)
