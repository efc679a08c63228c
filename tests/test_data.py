"""Folder scanning (parity with torchvision's ImageFolder) and robust decoding."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torchvision
from PIL import Image

from pipeline.errors import DataError
from pipeline.images.decode import DecodeError, decode_image, load_image
from pipeline.images.folders import IMG_EXTENSIONS, scan_folder

from conftest import make_image


def test_extensions_match_torchvision():
    assert IMG_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


def test_scan_matches_imagefolder(tmp_path):
    root = tmp_path / "tree"
    make_image(root / "b_cls" / "x.PNG")
    make_image(root / "b_cls" / "nested" / "deep" / "y.jpeg")
    make_image(root / "b_cls" / "nested" / "a.png")
    make_image(root / "b_cls" / "nested b" / "z.png")  # ' ' sorts before '/'
    make_image(root / "A_cls" / "1.bmp")
    make_image(root / "a_cls" / "2.webp")
    (root / "a_cls" / "notes.txt").write_text("not an image")
    make_image(root / ".hidden" / "h.png")  # ImageFolder counts hidden folders as classes too
    (root / "top.png").write_bytes(b"ignored: not in a class folder")
    ours = scan_folder(root)
    ref = torchvision.datasets.ImageFolder(str(root), allow_empty=True)
    assert ours.layout == "imagefolder"
    assert ours.classes == ref.classes
    assert [(str(root / r.relpath), r.label) for r in ours.records] == [(p, t) for p, t in ref.samples]
    assert all(r.split == "" for r in ours.records)


def test_scan_presplit_root(tmp_path):
    root = tmp_path / "hymenoptera"
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("ants", "bees"):
            for i in range(n):
                make_image(root / split / cls / f"{i}.jpg", seed=i)
    scan = scan_folder(root)
    assert scan.layout == "split"
    assert scan.classes == ["ants", "bees"]
    for split in ("train", "val"):
        ref = torchvision.datasets.ImageFolder(str(root / split))
        mine = [(str(root / r.relpath), r.label) for r in scan.records if r.split == split]
        assert mine == ref.samples


def test_scan_flat_unlabeled(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", seed=i)
    scan = scan_folder(tmp_path)
    assert scan.layout == "flat" and scan.classes == []
    assert [r.label for r in scan.records] == [-1, -1, -1]


def test_scan_survives_symlink_loop(tmp_path):
    make_image(tmp_path / "c" / "a.png")
    os.symlink(tmp_path / "c", tmp_path / "c" / "loop")
    scan = scan_folder(tmp_path)
    assert [r.relpath for r in scan.records] == ["c/a.png"]
    assert any("loop" in reason for _, reason in scan.skipped)


@pytest.mark.parametrize("setup,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: p, "no images found"),
])
def test_scan_bad_roots(tmp_path, setup, needle):
    with pytest.raises(DataError, match=needle):
        scan_folder(setup(tmp_path))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


def test_cmyk_to_rgb():
    out = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # pure red survives the conversion


def test_16bit_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_alpha_composited_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 255, 255))
    out = decode_image(_encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((2, 2), 1)
    out = decode_image(_encode(img, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (255, 0, 0)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not an image"),
])
def test_bad_bytes(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg(tmp_path):
    good = make_image(tmp_path / "a.jpg", size=(200, 150))
    data = good.read_bytes()
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data).size == (100, 100)


def test_unreadable_file(tmp_path, monkeypatch):
    p = make_image(tmp_path / "x.png")
    if os.geteuid() != 0:  # a real permission error where the OS enforces it
        p.chmod(0)
        with pytest.raises(DecodeError, match="permission denied"):
            load_image(p)
        p.chmod(0o644)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    import pipeline.images.decode

    monkeypatch.setattr(pipeline.images.decode, "open", denied, raising=False)  # root ignores chmod
    with pytest.raises(DecodeError, match="permission denied"):
        load_image(p)
