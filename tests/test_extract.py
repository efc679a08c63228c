"""Stage 1 end to end: reference numbers, incrementality, bad files, provenance."""
from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import load_cache
from pipeline.errors import IncompatibleError
from pipeline.extract import run_extract

from conftest import ROOT, make_image

# the README's plain-h5py recipe for reading a cache, as printed there
README_RECIPE = "import json\n" + (ROOT / "README.md").read_text().split("```python\nimport json\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_embeddings_equal_torchvision_reference(tmp_path, name):
    """Cached embedding == torchvision model (classifier -> Identity) on weights.transforms()(image)."""
    root = tmp_path / "photos"
    for i, size in enumerate([(500, 375), (375, 500), (320, 240)]):
        make_image(root / "c" / f"{i}.jpg", size=size, seed=i)
    out = tmp_path / "c.h5"
    run_extract(root, name, "none", out, seed=5, batch_size=2, workers=1)
    cache = load_cache(out)

    torch.manual_seed(5)
    ref = torchvision.models.get_model(name, weights=None).eval()
    if name.startswith("resnet"):
        ref.fc = torch.nn.Identity()
    else:
        ref.classifier = torch.nn.Identity()
    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    for rel, emb in zip(cache.paths, cache.embeddings):
        with torch.no_grad():
            expected = ref(tf(Image.open(root / rel).convert("RGB")).unsqueeze(0))[0].numpy()
        rel_err = np.abs(emb - expected).max() / np.abs(expected).max()
        assert rel_err < 1e-4, (rel, rel_err)


def test_incremental_add_change_delete(tmp_path, image_tree):
    out = tmp_path / "c.h5"
    s1 = run_extract(image_tree, "resnet18", "none", out, workers=0)
    assert (s1.new, s1.cached, s1.failed) == (12, 0, 0)
    before = load_cache(out)

    s2 = run_extract(image_tree, "resnet18", "none", out, workers=0)
    assert (s2.new, s2.cached, s2.removed, s2.commits) == (0, 12, 0, 0)

    make_image(image_tree / "dog" / "new.png", seed=99)  # added
    changed = image_tree / "cat" / "0.png"
    make_image(changed, seed=1234)  # changed content
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (image_tree / "eel" / "1.jpg").unlink()  # deleted
    s3 = run_extract(image_tree, "resnet18", "none", out, workers=0)
    assert (s3.new, s3.cached, s3.removed) == (2, 10, 1)

    after = load_cache(out)
    assert len(after) == 12
    assert "eel/1.jpg" not in after.paths and "dog/new.png" in after.paths
    old = dict(zip(before.paths, before.embeddings))
    new = dict(zip(after.paths, after.embeddings))
    assert not np.allclose(old["cat/0.png"], new["cat/0.png"])  # re-extracted
    np.testing.assert_array_equal(old["dog/2.bmp"], new["dog/2.bmp"])  # untouched rows kept as is

    fresh = tmp_path / "fresh.h5"
    run_extract(image_tree, "resnet18", "none", fresh, workers=0)
    ref = load_cache(fresh)
    assert list(ref.paths) == list(after.paths)
    np.testing.assert_allclose(ref.embeddings, after.embeddings, rtol=1e-4, atol=1e-5)


def test_load_cache_contract_and_plain_h5py(tmp_path, image_tree):
    out = tmp_path / "c.h5"
    run_extract(image_tree, "resnet18", "none", out, workers=0, commit_every=5, batch_size=4)
    c = load_cache(out)
    assert c.embeddings.shape == (12, 512) and c.embeddings.dtype == np.float32
    assert c.classes == ["cat", "dog", "eel"]
    assert list(c.labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert list(c.split) == [""] * 12 and c.failures == []
    for key in ("model", "weights", "preprocessing", "embed_dim", "classes", "torch_version", "torchvision_version", "seed"):
        assert key in c.meta
    assert c.meta["model"] == "resnet18" and c.meta["weights"] == "none" and c.meta["seed"] == 0
    assert list(c.fingerprints["size"]) == [(image_tree / p).stat().st_size for p in c.paths]  # aligned with rows
    # the README's recipe, exactly: plain h5py, no featcache
    namespace: dict = {}
    exec(README_RECIPE, namespace)
    X, paths, y, classes = namespace["read_featcache"](str(out))
    with h5py.File(out, "r") as f:
        assert f.attrs["model"] == "resnet18" and f.attrs["schema_version"] == 2
    assert classes == c.classes
    order = np.argsort(paths)
    np.testing.assert_array_equal(X[order], c.embeddings)
    assert list(paths[order]) == list(c.paths) and list(y[order]) == list(c.labels)


def test_bad_files_recorded_not_fatal(tmp_path, image_tree):
    (image_tree / "cat" / "empty.jpg").write_bytes(b"")
    (image_tree / "cat" / "text.png").write_text("not an image at all")
    good = make_image(image_tree / "dog" / "trunc.jpg", size=(300, 200)).read_bytes()
    (image_tree / "dog" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    out = tmp_path / "c.h5"
    s = run_extract(image_tree, "resnet18", "none", out, workers=1, batch_size=4)
    assert (s.new, s.failed) == (12, 3)
    reasons = dict(s.failures)
    assert "empty" in reasons["cat/empty.jpg"] and "not an image" in reasons["cat/text.png"]
    assert "truncated" in reasons["dog/trunc.jpg"]
    c = load_cache(out)
    assert dict(c.failures) == reasons and "dog/trunc.jpg" not in c.paths
    # failures are remembered: not retried until the file changes
    again = run_extract(image_tree, "resnet18", "none", out, workers=0)
    assert (again.new, again.failed, again.new_failed) == (0, 3, 0)
    # fixing a file clears its failure
    make_image(image_tree / "dog" / "trunc.jpg", seed=5)
    os.utime(image_tree / "dog" / "trunc.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    fixed = run_extract(image_tree, "resnet18", "none", out, workers=0)
    assert (fixed.new, fixed.failed) == (1, 2)


def test_presplit_and_unlabeled(tmp_path):
    root = tmp_path / "split"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            make_image(root / split / cls / "x.png", seed=hash((split, cls)) % 1000)
    run_extract(root, "resnet18", "none", tmp_path / "s.h5", workers=0)
    c = load_cache(tmp_path / "s.h5")
    assert sorted(set(c.split)) == ["test", "train", "val"] and c.classes == ["a", "b"]
    flat = tmp_path / "flat"
    for i in range(3):
        make_image(flat / f"{i}.png", seed=i)
    run_extract(flat, "resnet18", "none", tmp_path / "f.h5", workers=0)
    u = load_cache(tmp_path / "f.h5")
    assert list(u.labels) == [-1, -1, -1] and u.classes == []


def test_new_class_folder_remaps_labels_by_name(tmp_path, image_tree):
    out = tmp_path / "c.h5"
    run_extract(image_tree, "resnet18", "none", out, workers=0)
    make_image(image_tree / "ant" / "0.png", seed=77)  # sorts first: every index shifts
    run_extract(image_tree, "resnet18", "none", out, workers=0)
    c = load_cache(out)
    assert c.classes == ["ant", "cat", "dog", "eel"]
    for path, label in zip(c.paths, c.labels):
        assert c.classes[label] == path.split("/")[0]


def test_refuses_other_backbone_in_same_cache(tmp_path, image_tree):
    out = tmp_path / "c.h5"
    run_extract(image_tree, "resnet18", "none", out, workers=0)
    with pytest.raises(IncompatibleError, match="model='resnet18'.*'resnet34'"):
        run_extract(image_tree, "resnet34", "none", out, workers=0)
    with pytest.raises(IncompatibleError, match="dtype"):
        run_extract(image_tree, "resnet18", "none", out, workers=0, dtype="float16")
    assert len(load_cache(out)) == 12


def test_float16_cache(tmp_path, image_tree):
    out = tmp_path / "h.h5"
    run_extract(image_tree, "resnet18", "none", out, workers=0, dtype="float16")
    c = load_cache(out)
    assert c.embeddings.dtype == np.float16 and c.meta["dtype"] == "float16"


def test_a_file_refused_by_max_pixels_is_retried_when_the_limit_is_raised(tmp_path, tiny_hub):
    """A failure caused by a setting is not the file's fault: raising --max-pixels retries it;
    the same limit again does not, and other failures still wait for the file to change."""
    root = tmp_path / "data"
    make_image(root / "a" / "small.png", size=(20, 20))
    make_image(root / "a" / "big.png", size=(60, 50))
    make_image(root / "b" / "small.png", size=(20, 20), seed=1)
    (root / "b" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "c.h5"
    first = run_extract(root, tiny_hub, "none", out, max_pixels=1000)
    reasons = dict(first.failures)
    assert first.new == 2 and "over --max-pixels 1000" in reasons["a/big.png"] and "raise --max-pixels" in reasons["a/big.png"]
    again = run_extract(root, tiny_hub, "none", out, max_pixels=1000)
    assert again.new == 0 and again.failed == 2  # nothing retried under the same limit
    raised = run_extract(root, tiny_hub, "none", out, max_pixels=10_000)
    assert raised.new == 1 and dict(raised.failures) == {"b/broken.png": reasons["b/broken.png"]}
    assert raised.rows == 3
