"""Engines and precision: chosen from what the hardware has, compiled engines checked against
eager, reduced precision recorded in the cache and never mixed with fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import hardware, load_cache
from pipeline.errors import IncompatibleError, UsageError
from pipeline.extract import run_extract
from pipeline.hardware import choose_precision


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


def test_compiled_engine_matches_eager_or_says_why_not(tmp_path, image_tree, tiny_hub):
    messages: list[str] = []
    eager = run_extract(image_tree, tiny_hub, "none", tmp_path / "e.h5", workers=0, engine="eager", batch_size=4)
    # batch 5 over 12 images: the last batch (2) is padded to the compiled shape
    comp = run_extract(image_tree, tiny_hub, "none", tmp_path / "c.h5", workers=0, engine="compile", batch_size=5, log=messages.append)
    assert eager.engine == "eager"
    if comp.engine == "compile":
        assert any("max relative difference to eager" in m for m in messages)
        a, b = load_cache(tmp_path / "e.h5"), load_cache(tmp_path / "c.h5")
        assert b.engine == "compile"
        np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5 * np.abs(a.embeddings).max())
    else:  # no C++ compiler or an unsupported model: eager, and it says so
        assert any("unavailable" in m or "differs" in m for m in messages)


def test_auto_engine_stays_eager_for_small_jobs(tmp_path, image_tree, tiny_hub):
    messages: list[str] = []
    s = run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0, log=messages.append)
    assert s.engine == "eager" and any("do not repay compiling" in m for m in messages)
    with pytest.raises(UsageError, match="--engine"):
        run_extract(image_tree, tiny_hub, "none", tmp_path / "b.h5", engine="tensorrt")


def test_padded_last_batch_gives_the_same_rows():
    """The compiled engine pads a short last batch to its fixed shape; padding must not leak into rows."""
    from pipeline.engines import Engine
    from pipeline.hardware import PrecisionChoice

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(3, 3, 16, 16)
    fp32 = PrecisionChoice("fp32", None, "")
    padded = Engine("compile", net, fp32, torch.device("cpu"), False, batch_size=8).embed(x)
    plain = Engine("eager", net, fp32, torch.device("cpu"), False, batch_size=8).embed(x)
    assert padded.shape == (3, 4)
    np.testing.assert_allclose(padded, plain, rtol=1e-6)
