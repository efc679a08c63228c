"""Engines and precision: chosen from what the hardware has, compiled engines checked against
eager, reduced precision recorded in the cache and never mixed with fp32."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import load_cache
from pipeline.backbones import hardware
from pipeline.backbones.hardware import choose_precision
from pipeline.errors import IncompatibleError, UsageError
from pipeline.extract import run_extract


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))


@pytest.fixture
def avx512_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))


def test_precision_follows_the_hardware(no_bf16):
    cpu = torch.device("cpu")
    assert choose_precision("fp32", cpu).dtype is None
    refused = choose_precision("bf16", cpu)
    assert refused.name == "fp32" and "neither AMX nor AVX-512 BF16" in refused.note and "fp32" in refused.note
    assert choose_precision("auto", cpu).name == "fp32"
    assert choose_precision("fp16", cpu).name == "fp32" and "CUDA" in choose_precision("fp16", cpu).note
    with pytest.raises(UsageError, match="--precision"):
        choose_precision("int8", cpu)


def test_bf16_where_native(avx512_bf16):
    choice = choose_precision("auto", torch.device("cpu"))
    assert choice.name == "bf16" and choice.dtype == torch.bfloat16 and "avx512_bf16" in choice.note


def test_cpu_flags_are_read_from_this_machine():
    flags = hardware.cpu_flags()
    summary = hardware.cpu_summary()
    assert summary["avx2"] == ("avx2" in flags) and summary["capability"] == torch.backends.cpu.get_cpu_capability()


def test_bf16_cache_is_recorded_close_and_never_mixed_with_fp32(tmp_path, image_tree, tiny_hub, avx512_bf16):
    fp32 = run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0)
    bf16 = run_extract(image_tree, tiny_hub, "none", tmp_path / "b.h5", workers=0, precision="bf16")
    a, b = load_cache(tmp_path / "a.h5"), load_cache(tmp_path / "b.h5")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and (a.precision, b.precision) == ("fp32", "bf16")
    assert not np.array_equal(a.embeddings, b.embeddings)  # it really ran in bf16 ...
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=0, atol=3e-2 * np.abs(a.embeddings).max())  # ... and stayed close
    with pytest.raises(IncompatibleError, match="precision='fp32' but this run has precision='bf16'"):
        run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0, precision="bf16")


def test_default_cache_names_keep_precisions_apart(tmp_path):
    from pipeline.extract import default_cache_path

    assert default_cache_path("resnet50", "DEFAULT", tmp_path, tmp_path) != default_cache_path("resnet50", "DEFAULT", tmp_path, tmp_path, precision="bf16")


def test_compiled_engine_matches_eager_or_says_why_not(tmp_path, image_tree, tiny_hub, said):
    eager = run_extract(image_tree, tiny_hub, "none", tmp_path / "e.h5", workers=0, engine="eager", batch_size=4)
    # batch 5 over 12 images: the last batch (2) is padded to the compiled shape
    comp = run_extract(image_tree, tiny_hub, "none", tmp_path / "c.h5", workers=0, engine="compile", batch_size=5)
    assert eager.engine == "eager"
    if comp.engine == "compile":
        assert any("max relative difference to eager" in m for m in said)
        a, b = load_cache(tmp_path / "e.h5"), load_cache(tmp_path / "c.h5")
        assert b.engine == "compile"
        np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5 * np.abs(a.embeddings).max())
    else:  # no C++ compiler or an unsupported model: eager, and it says so
        assert any("unavailable" in m or "differs" in m for m in said)


def test_auto_engine_stays_eager_for_small_jobs(tmp_path, image_tree, tiny_hub, said):
    s = run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0)
    assert s.engine == "eager" and any("do not repay measuring" in m for m in said)
    with pytest.raises(UsageError, match="--engine"):
        run_extract(image_tree, tiny_hub, "none", tmp_path / "b.h5", engine="tensorrt")


def test_padded_last_batch_gives_the_same_rows():
    """The compiled engine pads a short last batch to its fixed shape; padding must not leak into rows."""
    from pipeline.backbones.engines import TorchEngine
    from pipeline.backbones.hardware import PrecisionChoice

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(3, 3, 16, 16)
    fp32 = PrecisionChoice("fp32", None, "")
    padded = TorchEngine("compile", net, fp32, torch.device("cpu"), False, batch_size=8).embed(x)
    plain = TorchEngine("eager", net, fp32, torch.device("cpu"), False, batch_size=8).embed(x)
    assert padded.shape == (3, 4)
    np.testing.assert_allclose(padded, plain, rtol=1e-6)


# ----------------------------------------------------------------------------- ONNX Runtime, OpenVINO, auto


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_exported_engines_match_eager_and_are_recorded(tmp_path, image_tree, tiny_hub, name, said):
    pytest.importorskip(name)
    eager = run_extract(image_tree, tiny_hub, "none", tmp_path / "e.h5", workers=0, engine="eager", batch_size=5, device="cpu")
    other = run_extract(image_tree, tiny_hub, "none", tmp_path / "o.h5", workers=0, engine=name, batch_size=5, device="cpu")
    assert (eager.engine, other.engine) == ("eager", name), said
    a, b = load_cache(tmp_path / "e.h5"), load_cache(tmp_path / "o.h5")
    assert b.engine == name and list(b.paths) == list(a.paths)
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5 * np.abs(a.embeddings).max())
    assert any(f"engine {name}: ready" in m for m in said)
    # the export is cached on disk: a second run does not export again
    said.clear()
    run_extract(image_tree, tiny_hub, "none", tmp_path / "o2.h5", workers=0, engine=name, batch_size=5, device="cpu")
    assert not any("exported the model" in m for m in said)


def test_missing_engine_package_is_a_usage_error(tmp_path, image_tree, tiny_hub, monkeypatch):
    from pipeline.backbones import engines

    monkeypatch.setattr(engines, "_installed", lambda name: False)
    with pytest.raises(UsageError, match=r"--engine onnxruntime needs the onnxruntime package: pip install 'featcache\[onnx\]'"):
        run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0, engine="onnxruntime")
    assert not (tmp_path / "a.h5").exists()
    assert engines.candidates(torch.device("cpu"), choose_precision("fp32", torch.device("cpu"))) == ["eager", "compile"]


def test_an_engine_that_differs_from_eager_is_refused(tmp_path, image_tree, tiny_hub, monkeypatch, said):
    """The reference check is real: an engine whose rows drift beyond 1e-4 is not used."""
    from pipeline.backbones import engines

    class Drifting(engines.TorchEngine):
        def embed(self, images):
            return super().embed(images) * (1 + 1e-3)

    monkeypatch.setitem(engines.BUILDERS, "compile", lambda ctx: Drifting("compile", ctx.model, ctx.precision, ctx.device, True, ctx.batch_size))
    s = run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0, engine="compile")
    assert s.engine == "eager" and any("differs from eager by 1.0e-03 (limit 1e-04); extracting in eager" in m for m in said)


def test_auto_uses_the_engine_measured_fastest_here(tmp_path, image_tree, tiny_hub, monkeypatch, said):
    """`engines` measures once and remembers; a later small extract with auto uses that engine
    (its export is warm), without measuring again."""
    from pipeline.backbones import engines
    from pipeline.extract import measure_engines

    cache_dir = tmp_path / "caches"
    result = measure_engines(tiny_hub, "none", batch_size=4, cache_dir=cache_dir, device="cpu")
    rates = {k: v for k, v in result["images_per_s"].items() if v}
    assert result["engine"] == max(rates, key=rates.get) and "eager" in rates
    assert json.loads(Path(result["choice_file"]).read_text())["engine"] == result["engine"]

    monkeypatch.setattr(engines, "tune", lambda *a, **k: pytest.fail("measured again"))
    choice = json.loads(Path(result["choice_file"]).read_text())
    monkeypatch.setattr(engines, "WARM_START_SHARE", dict.fromkeys(engines.ENGINES, 0.0))  # start-up not counted: the fastest is used
    s = run_extract(image_tree, tiny_hub, "none", cache_dir / "a.h5", workers=0, batch_size=4, device="cpu")
    assert s.engine == result["engine"] and any("measured fastest on this machine" in m for m in said)
    # counted, it decides for 12 images exactly as quickest_for computes it
    monkeypatch.setattr(engines, "WARM_START_SHARE", {"eager": 0.0, "compile": 0.35, "onnxruntime": 0.25, "openvino": 0.25})
    s = run_extract(image_tree, tiny_hub, "none", cache_dir / "c.h5", workers=0, batch_size=4, device="cpu")
    assert s.engine == engines.quickest_for(12, choice["images_per_s"], choice["build_seconds"])
    # another batch size is another measurement: small jobs stay eager until one is made
    s = run_extract(image_tree, tiny_hub, "none", cache_dir / "b.h5", workers=0, batch_size=3, device="cpu")
    assert s.engine == "eager"


def test_auto_counts_a_warm_start_against_a_small_job():
    """A hand computation: compile 63.5 img/s but 18.7 s to build cold (a warm start ~6.5 s),
    OpenVINO 62.7 img/s and 1.5 s: 512 images go to OpenVINO, a million to compile."""
    from pipeline.backbones.engines import quickest_for

    rates = {"eager": 40.0, "compile": 63.5, "openvino": 62.7, "onnxruntime": None}
    built = {"eager": 0.0, "compile": 18.7, "openvino": 1.5}
    assert quickest_for(512, rates, built) == "openvino"  # 0.375 + 8.17 s beats 6.55 + 8.06 s
    assert quickest_for(1_000_000, rates, built) == "compile"
    assert quickest_for(10, rates, built) == "eager"  # 0.25 s beats 0.53 s
    assert quickest_for(512, rates, {}) is None  # a choice file from before build times were recorded


def test_model_identity_follows_the_weights():
    from pipeline.backbones.engines import model_identity

    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    assert model_identity(a, {"model": "x"}) == model_identity(b, {"model": "x"})
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert model_identity(a, {"model": "x"}) != model_identity(b, {"model": "x"})


def test_decoders_are_sized_to_the_cores(monkeypatch):
    from pipeline.images.reader import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # on CUDA every core but one decodes (H200, 16 cores: 8 decoders 1,054 img/s, 12: 1,687, 15: 1,767), at most 32
    for cores, cpu, cuda in [(2, 0, 1), (4, 1, 3), (16, 4, 15), (64, 8, 32)]:
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert (default_workers("cpu"), default_workers("cuda")) == (cpu, cuda), cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers("cpu") == 1  # 4 cores per rank, a quarter of them decode
    assert default_workers("cuda") == 3


# ----------------------------------------------------------------------------- draft decode (opt-in)


def test_draft_decode_is_opt_in_recorded_and_never_mixed(tmp_path, tiny_hub):
    from PIL import Image

    from pipeline.extract import default_cache_path
    from pipeline.images.decode import decode_image

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg", quality=90)
    raw = (root / "a" / "0.jpg").read_bytes()
    assert decode_image(raw).size == (800, 600)
    assert decode_image(raw, draft_size=64).size == (100, 75)  # 1/8 scale: both sides still >= 64
    assert decode_image(raw, draft_size=300).size == (400, 300)  # 1/2: 1/4 would go below 300

    exact = run_extract(root, tiny_hub, "none", tmp_path / "exact.h5", workers=0)
    draft = run_extract(root, tiny_hub, "none", tmp_path / "draft.h5", workers=0, decode="draft")
    a, b = load_cache(tmp_path / "exact.h5"), load_cache(tmp_path / "draft.h5")
    assert (exact.decode, a.decode, draft.decode, b.decode) == ("exact", "exact", "draft", "draft")
    assert not np.array_equal(a.embeddings, b.embeddings)
    with pytest.raises(IncompatibleError, match="decode='exact' but this run has decode='draft'"):
        run_extract(root, tiny_hub, "none", tmp_path / "exact.h5", workers=0, decode="draft")
    with pytest.raises(UsageError, match="--decode 'fast'"):
        run_extract(root, tiny_hub, "none", tmp_path / "x.h5", decode="fast")
    assert default_cache_path("m", "w", root, tmp_path) != default_cache_path("m", "w", root, tmp_path, decode="draft")


def test_gpu_decode_needs_cuda_and_takes_only_plain_complete_jpegs(tmp_path, image_tree, tiny_hub):
    import io

    from PIL import Image

    from pipeline.images.gpu_decode import plain_jpeg

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--decode gpu needs a CUDA device"):
            run_extract(image_tree, tiny_hub, "none", tmp_path / "g.h5", decode="gpu")
        assert not (tmp_path / "g.h5").exists()

    def jpeg(mode: str, size=(40, 30)) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size, 128 if mode == "L" else (10, 20, 30) if mode == "RGB" else (1, 2, 3, 4)).save(buf, format="JPEG")
        return buf.getvalue()

    assert plain_jpeg(jpeg("RGB"), None) and plain_jpeg(jpeg("L"), None)
    assert not plain_jpeg(jpeg("CMYK"), None)  # nvJPEG's colour conversion differs: the CPU decodes it
    assert not plain_jpeg(jpeg("RGB")[:-40], None)  # truncated: the CPU path reports it as such
    assert not plain_jpeg(jpeg("RGB"), max_pixels=1000)  # 1,200 pixels: the CPU path reports the bomb
    assert not plain_jpeg((image_tree / "cat" / "0.png").read_bytes(), None)


def test_gpu_resize_in_groups_equals_one_by_one():
    """--decode gpu resizes same-size images in one call; the result must equal image by image."""
    from pipeline.backbones.registry import load_backbone
    from pipeline.images.gpu_decode import pixels_on_gpu

    to_pixels = load_backbone("resnet50", "none").preprocessing.pixels()
    g = torch.Generator().manual_seed(0)
    decoded = {i: torch.randint(0, 256, (3, 375 if i % 3 else 400, 500), dtype=torch.uint8, generator=g) for i in range(7)}
    order = [5, 1, 0, 3, 6, 2, 4]
    grouped = pixels_on_gpu(decoded, order, to_pixels)
    assert grouped.shape == (7, 3, 224, 224) and torch.equal(grouped, torch.stack([to_pixels(decoded[i]) for i in order]))


def test_cli_engines_measures_and_remembers(tmp_path, tiny_hub):
    from conftest import cli_json, run_cli

    out = cli_json("engines", "--model", tiny_hub, "--weights", "none", "--batch-size", "4", "--device", "cpu", "--cache-dir", str(tmp_path))
    assert out["engine"] in out["images_per_s"] and out["images_per_s"]["eager"] > 0
    assert Path(out["choice_file"]).parent == tmp_path / ".engines"
    proc = run_cli("engines", "--model", "resnet5", "--weights", "none")
    assert proc.returncode == 2 and "did you mean resnet50" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_decode_plumbing_with_the_cpu_decoder(image_tree):
    """The --decode gpu path (JPEGs passed undecoded, packed per batch, decoded once for every
    backbone, then resized per backbone) run with torchvision's CPU JPEG decoder, so it is
    checked where no GPU exists: every file ends in exactly one place, rows stay matched."""
    from PIL import Image

    from pipeline.backbones.registry import load_backbone
    from pipeline.images.folders import scan_folder
    from pipeline.images.gpu_decode import TorchvisionDecoder
    from pipeline.images.reader import SharedDecodeDataset, collate_shared, finish_on_gpu

    Image.open(image_tree / "cat" / "1.jpg").resize((120, 90)).save(image_tree / "dog" / "big.jpg")
    (image_tree / "eel" / "cut.jpg").write_bytes((image_tree / "cat" / "1.jpg").read_bytes()[:-60])
    records = scan_folder(image_tree).records
    pixels = [load_backbone(m, "none").preprocessing.pixels() for m in ("resnet18", "vit_b_16")]
    needs = [(True, r.relpath != "dog/big.jpg") for r in records]  # the second backbone already has big.jpg
    ds = SharedDecodeDataset(image_tree, records, pixels, needs, gpu_decode=True)
    parts = collate_shared([ds[i] for i in range(len(ds))], needs)
    jpegs = {records[i].relpath for i, _ in parts[0].encoded}
    assert jpegs == {"cat/1.jpg", "dog/1.jpg", "eel/1.jpg", "dog/big.jpg"}  # complete JPEGs only
    # one packed tensor per batch, shared by both backbones' parts (moved once, not per backbone)
    assert parts[0].jpeg_bytes is parts[1].jpeg_bytes and parts[0].jpeg_bytes.dtype == torch.uint8
    assert sum(n for _, n in parts[0].jpeg_spans) == len(parts[0].jpeg_bytes)
    assert {k: v.tolist() for k, v in parts[0].jpegs().items()} == {i: list((image_tree / records[i].relpath).read_bytes()) for i, _ in parts[0].encoded}
    finish_on_gpu(parts, pixels, TorchvisionDecoder(torch.device("cpu")))
    exact = SharedDecodeDataset(image_tree, records, pixels, needs)
    want = collate_shared([exact[i] for i in range(len(exact))], needs)
    for got, ref in zip(parts, want):
        assert not got.encoded and got.jpeg_bytes is None
        assert sorted(got.positions) == sorted(ref.positions) and got.failures == ref.failures
        assert [records[i].relpath for i, _ in got.failures] == ["eel/cut.jpg"]  # truncated: the CPU path caught it
        order = [ref.positions.index(p) for p in got.positions]
        assert got.sha256 == [ref.sha256[k] for k in order] and got.images.shape == ref.images.shape
        diff = (got.images.float() - ref.images[order].float()).abs()
        png = [k for k, p in enumerate(got.positions) if not records[p].relpath.endswith(".jpg")]
        assert diff[png].max() == 0 and diff.mean() < 8  # JPEGs: another resampling, close
    assert len(parts[1].positions) == len(parts[0].positions) - 1


def test_a_no_op_extract_reports_and_keeps_the_engine_that_made_the_rows(tmp_path, image_tree, tiny_hub):
    """A run with nothing to extract builds no engine: it says the cache's engine (not "eager")
    and leaves the recorded one as it was."""
    from pipeline.store import read_cache_meta

    from conftest import cli_json

    out = tmp_path / "c.h5"
    first = cli_json("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--engine", "onnxruntime", "--out", str(out), "--workers", "0")
    assert first["engine"] == "onnxruntime" and first["new"] == 12
    again = cli_json("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--out", str(out), "--workers", "0")
    assert again["new"] == 0 and again["engine"] == "onnxruntime"
    assert read_cache_meta(out)["engine"] == "onnxruntime"
