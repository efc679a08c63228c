"""torchvision datasets already on disk as a source (``torchvision:MNIST:ROOT``): its splits,
classes and pixels, never a download."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torchvision

from pipeline import load_cache
from pipeline.backbones import load_backbone
from pipeline.extract import run_extract

from conftest import run_cli


def _fake_mnist(root, n_train=6, n_test=4):
    """MNIST's own file format (idx), so torchvision.datasets.MNIST reads it offline."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 255, (n, 28, 28), dtype=np.uint8).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + rng.integers(0, 10, n).astype(np.uint8).tobytes())
    return root


def test_torchvision_dataset_rows_equal_torchvisions_items(tmp_path, tiny_hub):
    root = _fake_mnist(tmp_path / "mnist")
    s = run_extract(f"torchvision:MNIST:{root}", tiny_hub, "none", tmp_path / "c.h5", workers=2)
    assert s.new == 10 and s.classes[0] == "0 - zero" and len(s.classes) == 10
    c = load_cache(tmp_path / "c.h5")
    assert sorted(set(c.split)) == ["test", "train"] and c.meta["layout"] == "torchvision"
    train = torchvision.datasets.MNIST(str(root), train=True, download=False)
    bb = load_backbone(tiny_hub, "none")
    row = list(c.paths).index("train/0000003")
    image, label = train[3]
    with torch.no_grad():
        want = bb.model(bb.preprocessing.transform()(image.convert("RGB"))[None]).numpy()[0]
    np.testing.assert_allclose(c.embeddings[row], want, rtol=1e-5, atol=1e-6)
    assert c.labels[row] == label
    again = run_extract(f"torchvision:MNIST:{root}", tiny_hub, "none", tmp_path / "c.h5", workers=0)
    assert (again.new, again.cached) == (0, 10)


def test_a_dataset_that_is_not_on_disk_is_one_line_and_never_downloaded(tmp_path, tiny_hub):
    p = run_cli("extract", f"torchvision:CIFAR10:{tmp_path}", "-m", tiny_hub, "-w", "none", "--out", str(tmp_path / "c.h5"))
    assert p.returncode == 2 and "never downloads" in p.stderr and "CIFAR10" in p.stderr
    assert not any(tmp_path.iterdir()) or not (tmp_path / "cifar-10-batches-py").exists()
    from pipeline.errors import DataError
    from pipeline.images import scan_source

    with pytest.raises(DataError, match="torchvision:NAME:ROOT"):
        scan_source("torchvision:NoSuchSet:/tmp")
