"""Features from any layer in the same forward: ``extract --layer layer3 --layer layer4 --layer last4``.

Taps are checked against a forward hook on the untapped model (the same numbers), caches
against the tapped model on the same images, heads and predictions against the layer they
were fitted on, and job files (torchvision and timm side by side) for incremental reruns.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import load_cache
from pipeline.backbones import load_backbone
from pipeline.errors import BackboneError
from pipeline.extract import extract_many

from conftest import make_image, run_cli


def _hooked(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of module ``name`` during an ordinary forward (the reference for a tap)."""
    got = {}
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: got.setdefault("out", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return got["out"]


def test_cnn_taps_equal_a_hook_on_a_separate_forward_and_run_the_trunk_once():
    full = load_backbone("resnet18", "none", seed=0)
    tapped = load_backbone("resnet18", "none", seed=0, layers=["layer3", "layer4"])
    assert [(t.name, t.dim, t.pool) for t in tapped.taps] == [("layer3", 256, "avg"), ("layer4", 512, "avg")]
    x = torch.randn(2, 3, 64, 64)
    calls = []
    stem = next(m for n, m in tapped.model.named_modules() if n.endswith("conv1") and "layer" not in n)
    stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = tapped.model(x)
    assert len(calls) == 1  # one forward feeds every tap
    torch.testing.assert_close(out[:, tapped.tap_columns(0)], _hooked(full.model, "layer3", x).mean((2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(out[:, tapped.tap_columns(1)], _hooked(full.model, "layer4", x).mean((2, 3)), rtol=0, atol=0)
    with torch.no_grad():  # layer4 pooled is resnet's own embedding
        torch.testing.assert_close(out[:, tapped.tap_columns(1)], full.model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, block", [("vit_b_16", "encoder.layers.encoder_layer_5"), ("timm:vit_tiny_patch16_224", "blocks.5")])
def test_vit_taps_pool_tokens_and_last_k_is_dinov2s_recipe(name, block):
    if name.startswith("timm:"):
        pytest.importorskip("timm", reason="the timm extra is not installed")
    full = load_backbone(name, "none", seed=0)
    tapped = load_backbone(name, "none", seed=0, layers=[block, "last4"], token_pool="cls+mean")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = tapped.model(x)
        final = full.model(x)
    tokens = _hooked(full.model, block, x)
    width = tokens.shape[-1]
    torch.testing.assert_close(out[:, tapped.tap_columns(0)], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), rtol=0, atol=0)
    last4 = out[:, tapped.tap_columns(1)]
    assert last4.shape[1] == 5 * width  # 4 class tokens + the last block's mean patch token
    blocks = [n for n, _ in full.model.named_modules() if n.startswith(block.rsplit(".", 1)[0] + ".") and n.count(".") == block.count(".")]
    norm = full.model.get_submodule("norm" if name.startswith("timm:") else "encoder.ln")
    for i, b in enumerate(blocks[-4:]):  # each block's class token after the final norm
        torch.testing.assert_close(last4[:, i * width:(i + 1) * width], norm(_hooked(full.model, b, x))[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last4[:, 3 * width:4 * width], final, rtol=1e-5, atol=1e-5)  # the last one is the model's embedding


def test_tap_errors_are_one_clear_line():
    with pytest.raises(BackboneError, match="did you mean layer3"):
        load_backbone("resnet18", "none", layers=["layr3"])
    with pytest.raises(BackboneError, match="no transformer block list"):
        load_backbone("resnet18", "none", layers=["last4"])
    with pytest.raises(BackboneError, match="has 12 blocks"):
        load_backbone("vit_b_16", "none", layers=["last13"])


@pytest.fixture
def digits(tmp_path):
    from pipeline.demo import write_digits

    return write_digits(tmp_path / "digits", size=32, per_class=6, split=True)


def test_extract_writes_one_cache_per_layer_incrementally(digits, tmp_path):
    summaries = extract_many(digits, ["resnet18"], [tmp_path / "r18.h5"], {"weights": "none", "layers": ("layer3", "layer4"), "workers": 0, "batch_size": 16})
    paths = [tmp_path / "r18__at-layer3.h5", tmp_path / "r18__at-layer4.h5"]
    assert [s.cache for s in summaries] == [str(p) for p in paths] and [s.layer for s in summaries] == ["layer3", "layer4"]
    c3, c4 = load_cache(paths[0]), load_cache(paths[1])
    n = len(list(digits.rglob("*.png")))
    assert c3.embeddings.shape == (n, 256) and c4.embeddings.shape == (n, 512)
    assert (c3.meta["layer"], c3.meta["layer_pool"], c4.meta["layer"]) == ("layer3", "avg", "layer4")
    # the numbers are the tapped model's on the same preprocessed images
    bb = load_backbone("resnet18", "none", layers=["layer3", "layer4"])
    from PIL import Image

    x = torch.stack([bb.preprocessing.transform()(Image.open(digits / p).convert("RGB")) for p in c3.paths[:5]])
    with torch.no_grad():
        want = bb.model(x).numpy()
    np.testing.assert_allclose(c3.embeddings[:5], want[:, :256], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c4.embeddings[:5], want[:, 256:], rtol=1e-4, atol=1e-5)

    # incremental: nothing new; then a new image lands in both; a deleted layer cache is rebuilt alone
    again = extract_many(digits, ["resnet18"], [tmp_path / "r18.h5"], {"weights": "none", "layers": ("layer3", "layer4"), "workers": 0})
    assert [s.new for s in again] == [0, 0]
    make_image(next((digits / "train").iterdir()) / "new.png", size=(32, 32), seed=99)
    paths[1].unlink()
    import shutil

    shutil.rmtree(str(paths[1]) + ".parts", ignore_errors=True)
    third = extract_many(digits, ["resnet18"], [tmp_path / "r18.h5"], {"weights": "none", "layers": ("layer3", "layer4"), "workers": 0})
    assert [(s.new, s.cached) for s in third] == [(1, n), (n + 1, 0)]


def test_head_on_a_layer_predicts_through_that_layer_and_refuses_another(digits, tmp_path):
    extract_many(digits, ["resnet18"], [tmp_path / "r.h5"], {"weights": "none", "layers": ("layer3", "layer4"), "workers": 0})
    l3, l4 = tmp_path / "r__at-layer3.h5", tmp_path / "r__at-layer4.h5"
    p = run_cli("fit-head", str(l3), "--clf", "logreg", "--out", str(tmp_path / "h3.pt"), "-q")
    assert p.returncode == 0, p.stderr
    p = run_cli("predict", str(tmp_path / "h3.pt"), str(digits / "test"), "--json")
    assert p.returncode == 0, p.stderr
    predicted = {"/".join(r["path"].split("/")[-2:]): r for r in json.loads(p.stdout)["predictions"]}  # class/file
    from pipeline.heads import load_head

    head = load_head(tmp_path / "h3.pt")
    cache = load_cache(l3)
    test_rows = [i for i, s in enumerate(cache.split) if s == "test"]
    proba = head.predict_proba(cache.embeddings[test_rows])
    assert len(predicted) == len(test_rows) > 0
    for row, pr in zip(test_rows, proba):
        got = predicted[cache.paths[row].removeprefix("test/")]
        assert got["predicted"] == head.classes_[pr.argmax()] and abs(got["probability"] - pr.max()) < 1e-4
    p = run_cli("compare", str(l3), str(l4), "--json")  # layers ranked like backbones
    assert p.returncode == 0, p.stderr
    assert {r["name"] for r in json.loads(p.stdout)["leaderboard"]} == {"resnet18 layer3 (none)", "resnet18 layer4 (none)"}
    p = run_cli("evaluate", str(tmp_path / "h3.pt"), "--cache", str(l4))
    assert p.returncode == 5 and "layer='layer3'" in p.stderr and "layer='layer4'" in p.stderr


def test_models_layers_lists_tappable_names():
    p = run_cli("models", "--layers", "resnet18", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["layers"]}
    assert rows["layer3"]["width"] == 256 and rows["layer3.1"]["shape"] == [256, 14, 14]
    p = run_cli("models", "--layers", "vit_b_16", "--depth", "3")
    assert p.returncode == 0 and "encoder.layers.encoder_layer_11" in p.stdout and "last1 ... last12" in p.stdout


def test_job_file_mixes_torchvision_and_timm_with_layers_and_is_incremental(digits, tmp_path):
    pytest.importorskip("timm", reason="the timm extra is not installed")
    job = tmp_path / "mixed.toml"
    job.write_text(f'''
name = "mixed"
data = ["{digits}"]
cache_dir = "{tmp_path / 'cache'}"
out_dir = "{tmp_path / 'runs'}"
workers = 0
report = false

[[backbones]]
model = "resnet18"
weights = "none"
layers = ["layer3", "layer4"]

[[backbones]]
model = "timm:convnext_atto"
weights = "none"

[[heads]]
clf = "logreg"
''')
    p = run_cli("run", str(job), "--json")
    assert p.returncode == 0, p.stderr
    steps = json.loads(p.stdout)["steps"]
    extracted = [s["target"] for s in steps if s["kind"] == "extract" and s["action"] == "run"]
    assert len(extracted) == 3 and any("at-layer3" in t for t in extracted) and any("timm-convnext_atto" in t for t in extracted)
    assert sum(s["kind"] == "fit-head" and s["action"] == "run" for s in steps) == 3
    p = run_cli("run", str(job), "--json")
    assert p.returncode == 0, p.stderr
    assert all(s["action"] == "skip" for s in json.loads(p.stdout)["steps"])
