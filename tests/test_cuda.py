"""CUDA paths: run only where a GPU is visible (skipped on CPU-only machines and in CI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import load_cache
from pipeline.extract import run_extract

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_rows_equal_cpu_rows_in_exact_fp32(tmp_path, image_tree, tiny_hub):
    """Exact fp32 on a GPU means no TF32 convolutions: rows within 1e-4 of the CPU's."""
    run_extract(image_tree, tiny_hub, "none", tmp_path / "cpu.h5", device="cpu", workers=0, engine="eager")
    s = run_extract(image_tree, tiny_hub, "none", tmp_path / "gpu.h5", device="cuda", workers=2, engine="eager")
    assert s.device.startswith("cuda") and s.precision == "fp32"
    a, b = load_cache(tmp_path / "cpu.h5"), load_cache(tmp_path / "gpu.h5")
    assert list(a.paths) == list(b.paths)
    err = np.abs(a.embeddings - b.embeddings).max() / np.abs(a.embeddings).max()
    assert err < 1e-4, err


def test_resnet50_on_cuda_matches_cpu(tmp_path, image_tree):
    """A real backbone (cuDNN picks other kernels than the tiny model's)."""
    run_extract(image_tree, "resnet50", "none", tmp_path / "cpu.h5", device="cpu", workers=0, engine="eager")
    run_extract(image_tree, "resnet50", "none", tmp_path / "gpu.h5", device="cuda", workers=2, engine="eager")
    a, b = load_cache(tmp_path / "cpu.h5"), load_cache(tmp_path / "gpu.h5")
    err = np.abs(a.embeddings - b.embeddings).max() / np.abs(a.embeddings).max()
    assert err < 1e-4, err


def test_bf16_and_amp_on_cuda_are_recorded_and_close(tmp_path, image_tree):
    run_extract(image_tree, "resnet18", "none", tmp_path / "fp32.h5", device="cuda", workers=0)
    s = run_extract(image_tree, "resnet18", "none", tmp_path / "bf16.h5", device="cuda", workers=0, precision="bf16")
    amp = run_extract(image_tree, "resnet18", "none", tmp_path / "amp.h5", device="cuda", workers=0, amp=True)
    want = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32"
    assert s.precision == want and amp.precision in ("bf16", "fp16")
    a, b = load_cache(tmp_path / "fp32.h5"), load_cache(tmp_path / "bf16.h5")
    assert b.precision == want
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=0, atol=3e-2 * np.abs(a.embeddings).max())


def test_compiled_engine_on_cuda_matches_eager(tmp_path, image_tree):
    messages: list[str] = []
    run_extract(image_tree, "resnet18", "none", tmp_path / "e.h5", device="cuda", workers=0, engine="eager", batch_size=5)
    s = run_extract(image_tree, "resnet18", "none", tmp_path / "c.h5", device="cuda", workers=0, engine="compile", batch_size=5, log=messages.append)
    assert s.engine == "compile", messages
    a, b = load_cache(tmp_path / "e.h5"), load_cache(tmp_path / "c.h5")
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5 * np.abs(a.embeddings).max())


def test_finetune_with_amp_on_cuda(tiny_head, tmp_path):
    from pipeline.finetune.run import run_finetune

    r = run_finetune(tiny_head, tmp_path / "m.pt", options={"epochs": 1, "amp": True}, device="cuda", workers=2)
    assert r.epochs_done == 1 and np.isfinite(r.history[-1]["train_loss"])


def test_gpu_decode_is_close_recorded_and_handles_what_nvjpeg_cannot(tmp_path, image_tree):
    """nvJPEG + GPU resampling: rows close to the exact CPU path (not equal), recorded as
    decode=gpu; PNG/BMP and a truncated JPEG take the CPU way (the latter recorded as failed)."""
    from PIL import Image

    jpg = image_tree / "cat" / "1.jpg"
    big = Image.open(jpg).resize((500, 375))
    for i in range(6):
        big.rotate(i * 7).save(image_tree / "dog" / f"photo{i}.jpg", quality=92)
    (image_tree / "eel" / "cut.jpg").write_bytes(jpg.read_bytes()[:-100])
    exact = run_extract(image_tree, "resnet18", "none", tmp_path / "exact.h5", device="cuda", workers=2)
    gpu = run_extract(image_tree, "resnet18", "none", tmp_path / "gpu.h5", device="cuda", workers=2, decode="gpu")
    assert gpu.decode == "gpu" and [p for p, _ in gpu.failures] == [p for p, _ in exact.failures] == ["eel/cut.jpg"]
    a, b = load_cache(tmp_path / "exact.h5"), load_cache(tmp_path / "gpu.h5")
    assert b.decode == "gpu" and list(a.paths) == list(b.paths)
    rel = np.abs(a.embeddings - b.embeddings).max(axis=1) / np.abs(a.embeddings).max(axis=1)
    png_rows = [i for i, p in enumerate(a.paths) if not p.endswith(".jpg")]
    photo_rows = [i for i, p in enumerate(a.paths) if "photo" in p]
    assert rel[png_rows].max() < 1e-4  # decoded on the CPU either way
    # 500x375 photos: close, not equal (measured on an H100: 1.1e-3 to 1.7e-3). The 48x40 noise
    # JPEGs, upsampled 5x by the resize, differ more (up to 0.12): GPU and PIL resampling round differently
    assert 0 < rel[photo_rows].max() < 1e-2, rel[photo_rows]


def test_logreg_and_knn_heads_on_cuda_match_cpu():
    """The stage-2 solvers on the GPU (float32 there) give the CPU's predictions."""
    from sklearn.datasets import load_digits

    from pipeline.heads import KNNHead
    from pipeline.heads.logreg import LogRegHead

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    cpu, gpu = LogRegHead(C=0.5, device="cpu").fit(X[:1200], y[:1200]), LogRegHead(C=0.5, device="cuda").fit(X[:1200], y[:1200])
    assert (cpu.predict(X[1200:]) == gpu.predict(X[1200:])).mean() > 0.99
    np.testing.assert_allclose(gpu.predict_proba(X[1200:]), cpu.predict_proba(X[1200:]), atol=2e-2)
    a, b = KNNHead(k=10, device="cpu").fit(X[:1200], y[:1200]), KNNHead(k=10, device="cuda").fit(X[:1200], y[:1200])
    np.testing.assert_allclose(b.predict_proba(X[1200:]), a.predict_proba(X[1200:]), atol=1e-4)
