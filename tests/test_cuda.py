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


def test_compiled_engine_on_cuda_matches_eager(tmp_path, image_tree, said):
    run_extract(image_tree, "resnet18", "none", tmp_path / "e.h5", device="cuda", workers=0, engine="eager", batch_size=5)
    s = run_extract(image_tree, "resnet18", "none", tmp_path / "c.h5", device="cuda", workers=0, engine="compile", batch_size=5)
    assert s.engine == "compile", said
    a, b = load_cache(tmp_path / "e.h5"), load_cache(tmp_path / "c.h5")
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5 * np.abs(a.embeddings).max())


def test_finetune_with_amp_on_cuda(tiny_head, tmp_path):
    from pipeline.finetune.run import run_finetune

    r = run_finetune(tiny_head, tmp_path / "m.pt", options={"epochs": 1, "amp": True}, device="cuda", workers=2, trust_hub=True)
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
    # float32 L-BFGS on the GPU stops at a slightly different point than on the CPU (an H200
    # with torch 2.11: one probability of 597x10 off by 0.08), so compare the fits as a whole
    p_gpu, p_cpu = gpu.predict_proba(X[1200:]), cpu.predict_proba(X[1200:])
    assert np.abs(p_gpu - p_cpu).mean() < 5e-3 and np.abs(p_gpu - p_cpu).max() < 0.15
    a, b = KNNHead(k=10, device="cpu").fit(X[:1200], y[:1200]), KNNHead(k=10, device="cuda").fit(X[:1200], y[:1200])
    np.testing.assert_allclose(b.predict_proba(X[1200:]), a.predict_proba(X[1200:]), atol=1e-4)


needs_nvimgcodec = pytest.mark.skipif(
    not __import__("pipeline.images.gpu_decode", fromlist=["x"]).nvimgcodec_installed(), reason="nvImageCodec not installed (pip install -e '.[gpu]')")


@pytest.mark.parametrize("library", ["torchvision", pytest.param("nvimgcodec", marks=needs_nvimgcodec)])
def test_each_gpu_decoder_is_close_to_exact_and_recorded(tmp_path, image_tree, library):
    """Each decoder library: rows close to the exact CPU path, the library recorded in the
    cache, a truncated JPEG and a PNG taking the CPU way."""
    from PIL import Image

    jpg = image_tree / "cat" / "1.jpg"
    for i in range(6):
        Image.open(jpg).resize((500, 375)).rotate(i * 7).save(image_tree / "dog" / f"photo{i}.jpg", quality=92)
    (image_tree / "eel" / "cut.jpg").write_bytes(jpg.read_bytes()[:-100])
    run_extract(image_tree, "resnet18", "none", tmp_path / "exact.h5", device="cuda", workers=2)
    s = run_extract(image_tree, "resnet18", "none", tmp_path / "gpu.h5", device="cuda", workers=2, decode="gpu", gpu_decoder=library, batch_size=4)
    assert s.gpu_decoder == library and [p for p, _ in s.failures] == ["eel/cut.jpg"]
    a, b = load_cache(tmp_path / "exact.h5"), load_cache(tmp_path / "gpu.h5")
    assert b.meta["gpu_decoder"] == library and list(a.paths) == list(b.paths)
    rel = np.abs(a.embeddings - b.embeddings).max(axis=1) / np.abs(a.embeddings).max(axis=1)
    photo_rows = [i for i, p in enumerate(a.paths) if "photo" in p]
    png_rows = [i for i, p in enumerate(a.paths) if p.endswith(".png")]
    assert rel[png_rows].max() < 1e-4 and rel[photo_rows].max() < 1e-2, rel
    assert s.timings["gpu_busy_s"] > 0 and 0 < s.timings["gpu_busy_share"] <= 1


def test_two_backbones_with_gpu_decode_equal_one_at_a_time(tmp_path, image_tree):
    """One decode per batch for both backbones gives each the rows it gets alone."""
    from pipeline.extract import extract_many

    opts = dict(weights="none", device="cuda", workers=2, decode="gpu", batch_size=5)
    extract_many(image_tree, ["resnet18", "mobilenet_v3_small"], [tmp_path / "a.h5", tmp_path / "b.h5"], **opts)
    for name, model in (("a", "resnet18"), ("b", "mobilenet_v3_small")):
        run_extract(image_tree, model, out=tmp_path / f"{name}1.h5", **opts)
        both, alone = load_cache(tmp_path / f"{name}.h5"), load_cache(tmp_path / f"{name}1.h5")
        assert list(both.paths) == list(alone.paths)
        np.testing.assert_allclose(both.embeddings, alone.embeddings, rtol=1e-5, atol=1e-5 * np.abs(alone.embeddings).max())


def test_device_feeder_raises_a_decoder_error_in_the_main_thread_and_stops():
    from pipeline.images.feeder import DeviceFeeder
    from pipeline.images.gpu_decode import GpuJpegDecoder
    from pipeline.images.reader import DecodedBatch

    class Broken(GpuJpegDecoder):
        name, device = "broken", torch.device("cuda")

        def decode(self, jpegs):
            raise RuntimeError("decoder blew up")

    def batches():
        for k in range(100):
            yield [DecodedBatch([], None, [], [], [(k, "sha")], torch.zeros(4, dtype=torch.uint8), [(0, 4)])]

    feeder = DeviceFeeder(batches(), torch.device("cuda"), [lambda x: x], Broken())
    with pytest.raises(RuntimeError, match="decoder blew up"):
        list(feeder)
    feeder.close()
    assert not feeder._thread.is_alive()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cudagraph_engine_equals_eager_with_batches_in_flight(tmp_path, precision):
    """Two batches queued before the first is read (the graph's output buffer is reused by the
    second replay), and a short last batch: every row equals eager's."""
    from pipeline.backbones.engines import build_checked
    from pipeline.backbones.hardware import PrecisionChoice
    from pipeline.backbones.registry import load_backbone
    from pipeline.inference import engine_context

    chosen = PrecisionChoice(precision, None if precision == "fp32" else torch.bfloat16, "")
    ctx = engine_context(load_backbone("resnet18", "none"), torch.device("cuda"), chosen, 8, tmp_path)
    graph, eager = build_checked("cudagraph", ctx), ctx.eager()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 3, 224, 224, generator=g), torch.randn(5, 3, 224, 224, generator=g)
    rows_a, rows_b = graph.embed_async(a), graph.embed_async(b)
    got_b, got_a = rows_b(), rows_a()
    tol = 1e-4 if precision == "fp32" else 2e-2
    for got, x in ((got_a, a), (got_b, b)):
        want = eager.embed(x)
        assert got.shape == want.shape
        assert np.abs(got - want).max() / np.abs(want).max() < tol
