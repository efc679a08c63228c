"""The GPU data path's pieces that run without a GPU: the decoder libraries (nvImageCodec on
its CPU backend, torchvision's on CPU), the choice between them, and the runner's overlap of
batch k+1's forward with batch k's writer (tests/test_cuda.py runs them on a GPU)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UsageError
from pipeline.images import gpu_decode
from pipeline.images.gpu_decode import NvImageCodecDecoder, TorchvisionDecoder, nvimgcodec_installed, open_gpu_decoder

needs_nvimgcodec = pytest.mark.skipif(not nvimgcodec_installed(), reason="nvImageCodec not installed (pip install -e '.[gpu]')")


def jpeg_bytes(seed: int, size=(64, 48), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@needs_nvimgcodec
def test_nvimgcodec_decodes_planar_rgb_like_pil_and_fails_files_alone():
    """Its CPU backend is libjpeg-turbo, as PIL's: the same pixels, as CHW. A greyscale JPEG
    comes out as 3 channels; truncated and non-JPEG bytes fail alone, not the batch."""
    files = {0: jpeg_bytes(0), 1: jpeg_bytes(1, (33, 17)), 2: jpeg_bytes(2, mode="L"), 3: jpeg_bytes(3)[:200], 4: b"not an image at all" * 4}
    decoded, failed = NvImageCodecDecoder(torch.device("cpu")).decode({k: as_tensor(v) for k, v in files.items()})
    assert sorted(decoded) == [0, 1, 2] and sorted(failed) == [3, 4] and "refused" in failed[3]
    for k in (0, 1, 2):
        want = torch.from_numpy(np.array(Image.open(io.BytesIO(files[k])).convert("RGB"))).permute(2, 0, 1)
        assert decoded[k].dtype == torch.uint8 and torch.equal(decoded[k], want), k


@needs_nvimgcodec
def test_nvimgcodec_hides_its_missing_codec_noise_but_not_other_output(capfd):
    NvImageCodecDecoder(torch.device("cpu"))
    err = capfd.readouterr().err
    assert "nvjpeg2k" not in err and "nvTIFF" not in err, err
    with gpu_decode._native_stderr_filtered(["noise"]):
        import os

        os.write(2, b"noise from a library\nreal problem\n")
    assert capfd.readouterr().err == "real problem\n"


def test_gpu_decoder_choice(monkeypatch):
    assert isinstance(open_gpu_decoder("torchvision", torch.device("cpu")), TorchvisionDecoder)
    with pytest.raises(UsageError, match="--gpu-decoder 'nvjpeg'"):
        open_gpu_decoder("nvjpeg", torch.device("cpu"))
    assert isinstance(open_gpu_decoder("auto", torch.device("cpu")), TorchvisionDecoder)  # measured as fast or faster
    monkeypatch.setattr(gpu_decode, "nvimgcodec_installed", lambda: False)
    with pytest.raises(UsageError, match=r"needs nvImageCodec: pip install -e '.\[gpu\]'"):
        open_gpu_decoder("nvimgcodec", torch.device("cpu"))
    monkeypatch.setattr(gpu_decode, "torchvision_decodes_on_gpu", lambda: False)  # a torchvision after the deprecation
    with pytest.raises(UsageError, match="no JPEG decoder any more"):
        open_gpu_decoder("torchvision", torch.device("cpu"))
    monkeypatch.setattr(gpu_decode, "nvimgcodec_installed", lambda: True)
    monkeypatch.setattr(gpu_decode, "NvImageCodecDecoder", lambda device: "nv")
    assert open_gpu_decoder("auto", torch.device("cpu")) == "nv"


@pytest.mark.parametrize("library", ["torchvision", pytest.param("nvimgcodec", marks=needs_nvimgcodec)])
def test_gpu_decode_path_with_each_library_on_cpu(image_tree, library):
    """The --decode gpu path end to end through finish_on_gpu with each decoder library (run
    on the CPU here): every file ends in one place, and the pixels equal the exact path's
    where the decoder is libjpeg-turbo and the resize the same."""
    from pipeline.backbones.registry import load_backbone
    from pipeline.images.folders import scan_folder
    from pipeline.images.reader import SharedDecodeDataset, collate_shared, finish_on_gpu

    Image.open(image_tree / "cat" / "1.jpg").resize((120, 90)).save(image_tree / "dog" / "big.jpg")
    (image_tree / "eel" / "cut.jpg").write_bytes((image_tree / "cat" / "1.jpg").read_bytes()[:-60])
    records = scan_folder(image_tree).records
    pixels = [load_backbone("resnet18", "none").preprocessing.pixels()]
    needs = [(True,) for _ in records]
    got = collate_shared([SharedDecodeDataset(image_tree, records, pixels, needs, gpu_decode=True)[i] for i in range(len(records))], needs)
    finish_on_gpu(got, pixels, open_gpu_decoder(library, torch.device("cpu")))
    want = collate_shared([SharedDecodeDataset(image_tree, records, pixels, needs)[i] for i in range(len(records))], needs)
    assert sorted(got[0].positions) == sorted(want[0].positions) and got[0].failures == want[0].failures
    order = [want[0].positions.index(p) for p in got[0].positions]
    diff = (got[0].images.float() - want[0].images[order].float()).abs()
    assert diff.mean() < 8  # the tensor resize rounds differently from PIL's; the decoded pixels are the same


def test_runner_starts_the_next_forward_before_writing_a_batch():
    """Batch k+1's forward is queued before batch k's rows are consumed (on a GPU the consumer
    then overlaps the model); after an interrupt the started batch is still consumed."""
    from pipeline.images.reader import DecodedBatch
    from pipeline.inference import Mapper, run_batches
    from pipeline.overlap import StageClock

    events: list[str] = []

    class Engine:
        device = torch.device("cpu")

        def embed_async(self, images):
            k = int(images[0, 0, 0, 0])
            events.append(f"forward {k}")
            return lambda: events.append(f"rows {k}") or np.zeros((len(images), 2), np.float32)

    class Prep:
        normalize = staticmethod(lambda x: x)

    mapper = Mapper(Prep(), Engine())

    def consume(k, batch, rows_of) -> None:
        rows_of()
        events.append(f"write {int(batch.images[0, 0, 0, 0])}")

    def batches(n: int, interrupt_after: int | None = None):
        for k in range(n):
            if k == interrupt_after:
                raise KeyboardInterrupt
            yield [DecodedBatch([k], torch.full((1, 1, 1, 1), k), ["x"], [])]

    clock = StageClock()
    run_batches([mapper], batches(3), consume, torch.device("cpu"), clock)
    assert events == ["forward 0", "forward 1", "rows 0", "write 0", "forward 2", "rows 1", "write 1", "rows 2", "write 2"]
    assert clock.loop >= clock.first_batch >= 0 and clock.images_after_first == 2
    events.clear()
    with pytest.raises(KeyboardInterrupt):
        run_batches([mapper], batches(3, interrupt_after=2), consume, torch.device("cpu"), StageClock())
    assert events == ["forward 0", "forward 1", "rows 0", "write 0", "rows 1", "write 1"]
