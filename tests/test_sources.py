"""Backbones beyond torchvision: ``timm:NAME`` and ``pretrainedmodels:NAME``.

Each family's cached embedding is checked against the source library's own computation on
the same image file (its own transform, its own forward), the weights rules against the
local caches they read, and fine-tuning against BatchNorm that must not move.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import load_cache
from pipeline.backbones import load_backbone
from pipeline.errors import BackboneError
from pipeline.extract import run_extract

from conftest import ROOT, make_image, run_cli

timm = pytest.importorskip("timm", reason="the timm extra is not installed (pip install -e '.[timm]')")

# a CNN with BatchNorm, a ConvNeXt (LayerNorm), a ViT, an SE-ResNet: small members of each family
TIMM_FAMILIES = [("resnet10t", 512), ("convnext_atto", 320), ("vit_tiny_patch16_224", 192), ("legacy_seresnet18", 512)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of odd-sized noisy JPEGs (not square, not the model's size)."""
    root = tmp_path_factory.mktemp("photos") / "data"
    for c, cls in enumerate(["ant", "bee"]):
        for i in range(2):
            make_image(root / cls / f"{i}.jpg", size=(97 + 13 * i, 71 + 5 * c), seed=7 * c + i)
    return root


def _timm_reference(name: str, state: dict, paths: list) -> np.ndarray:
    """timm's own inference: its transform on the file, then forward_head(forward_features(x), pre_logits=True)."""
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    ref.load_state_dict(state)
    ref.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(ref))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return ref.forward_head(ref.forward_features(x), pre_logits=True).numpy()


@pytest.mark.parametrize("name, dim", TIMM_FAMILIES)
def test_timm_embedding_equals_timms_own_computation(name, dim, photos, tmp_path):
    s = run_extract(photos, f"timm:{name}", "none", tmp_path / "c.h5", workers=0, batch_size=3)
    assert s.embed_dim == dim and s.new == 4
    data = load_cache(tmp_path / "c.h5")
    assert data.meta["preprocessing"]["source"] == "timm data config"
    backbone = load_backbone(f"timm:{name}", "none", seed=0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    assert dim == (getattr(model, "head_hidden_size", None) or model.num_features)
    ref = _timm_reference(name, backbone.model.state_dict(), [photos / p for p in data.paths])
    err = np.abs(data.embeddings - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


def test_timm_preprocessing_is_the_models_own_not_torchvisions():
    """bicubic, crop_pct-derived resize, the model's mean/std (ViT: 0.5) — and squash crops as two sizes."""
    vit = load_backbone("timm:vit_tiny_patch16_224", "none").preprocessing
    assert (vit.interpolation, vit.resize_size, vit.crop_size, vit.mean) == ("bicubic", [248], [224], [0.5, 0.5, 0.5])
    from pipeline.backbones.timm_models import preprocessing_of

    m = timm.create_model("resnet10t", pretrained=False, num_classes=0, pretrained_cfg_overlay={"crop_mode": "squash", "crop_pct": 0.95})
    pre = preprocessing_of(m)
    size = m.pretrained_cfg["input_size"][-1]
    assert pre.resize_size == [int(size / 0.95)] * 2 and pre.crop_size == [size]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    want = timm.data.create_transform(**timm.data.resolve_model_data_config(m))(img)
    assert torch.allclose(pre.transform()(img), want, atol=1e-6)


def test_timm_default_weights_come_from_the_local_hugging_face_cache(tmp_path):
    """DEFAULT reads the HF cache without the network; the same file as --weights PATH gives the same numbers."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()  # with its classifier, as published
    snap = tmp_path / "hf" / "hub" / "models--timm--convnext_atto.d2_in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, snap / "snapshots" / ("0" * 40) / "model.safetensors")
    data = tmp_path / "data"
    make_image(data / "a" / "0.png", seed=1)
    make_image(data / "b" / "0.png", seed=2)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    p = run_cli("extract", str(data), "-m", "timm:convnext_atto", "--out", str(tmp_path / "d.h5"), "--workers", "0", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert '"weights": "timm:convnext_atto.d2_in1k"' in p.stdout
    p = run_cli("extract", str(data), "-m", "timm:convnext_atto", "-w", str(snap / "snapshots" / ("0" * 40) / "model.safetensors"),
                "--out", str(tmp_path / "p.h5"), "--workers", "0", env=env)
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(load_cache(tmp_path / "d.h5").embeddings, load_cache(tmp_path / "p.h5").embeddings)
    p = run_cli("extract", str(data), "-m", "timm:convnext_atto", "-w", "D2_in1k", "--out", str(tmp_path / "t.h5"), "--workers", "0", env=env)
    assert p.returncode == 0, p.stderr  # a tag in any case
    np.testing.assert_array_equal(load_cache(tmp_path / "d.h5").embeddings, load_cache(tmp_path / "t.h5").embeddings)
    assert load_cache(tmp_path / "t.h5").meta["weights"] == "timm:convnext_atto.d2_in1k"
    ref = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.fc.")})
    assert not torch.equal(ref.stem[0].weight, load_backbone("timm:convnext_atto", "none").model.stem[0].weight)  # not a random init


def test_timm_weights_offline_and_not_cached_is_one_clear_line(tmp_path):
    data = tmp_path / "data"
    make_image(data / "a" / "0.png")
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    p = run_cli("extract", str(data), "-m", "timm:convnext_atto", "--out", str(tmp_path / "c.h5"), env=env)
    assert p.returncode == 6, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "timm:convnext_atto.d2_in1k" in line and "Hugging Face cache" in line and "--weights none" in line
    assert not (tmp_path / "c.h5").exists()  # nothing half-written, no random init
    p = run_cli("extract", str(data), "-m", "timm:convnext_atto", "-w", "no_such_tag", "--out", str(tmp_path / "c.h5"), env=env)
    assert p.returncode == 2 and "d2_in1k" in p.stderr and "not a pretrained tag" in p.stderr
    p = run_cli("extract", str(data), "-m", "timm:convnxt_atto", "--out", str(tmp_path / "c.h5"), env=env)
    assert p.returncode == 2 and "timm:convnext_atto" in p.stderr  # a close match is suggested


def test_missing_timm_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(BackboneError, match=r"pip install -e '\.\[timm\]'"):
        load_backbone("timm:resnet10t", "none")


def test_pretrainedmodels_bgr_0_255_model_equals_its_own_transform(photos, tmp_path):
    """bninception expects BGR channels and 0-255 values: honoured, recorded, and equal to the package's own TransformImage."""
    pm = pytest.importorskip("pretrainedmodels", reason="the pretrainedmodels extra is not installed")
    from munch import Munch
    from pretrainedmodels.utils import TransformImage

    s = run_extract(photos, "pretrainedmodels:bninception", "none", tmp_path / "c.h5", workers=0, batch_size=4)
    data = load_cache(tmp_path / "c.h5")
    pre = data.meta["preprocessing"]
    assert s.embed_dim == 1024 and pre["input_space"] == "BGR" and pre["input_range"] == 255.0 and pre["mean"] == [104.0, 117.0, 128.0]
    settings = pm.pretrained_settings["bninception"]["imagenet"]
    ref = pm.__dict__["bninception"](num_classes=1000, pretrained=None)
    ref.last_linear = torch.nn.Identity()
    ref.load_state_dict(load_backbone("pretrainedmodels:bninception", "none").model.state_dict())
    transform = TransformImage(Munch(settings))
    x = torch.stack([transform(Image.open(photos / p).convert("RGB")) for p in data.paths])
    with torch.no_grad():
        want = ref.eval()(x).numpy()
    assert np.abs(data.embeddings - want).max() / np.abs(want).max() < 1e-4


def test_pretrainedmodels_unknown_name_points_to_timms_port():
    pytest.importorskip("pretrainedmodels", reason="the pretrainedmodels extra is not installed")
    p = run_cli("extract", str(ROOT), "-m", "pretrainedmodels:se_resnet51")
    assert p.returncode == 2 and "se_resnet50" in p.stderr


def test_finetune_of_a_timm_se_resnet_keeps_batchnorm_bit_identical():
    """Stage 3's trainer on timm's SE-ResNet (all blocks thawed): every BatchNorm tensor stays bit-identical, convolutions and SE layers train."""
    from pipeline.finetune.freezing import batchnorm_layers
    from pipeline.finetune.model import assemble
    from pipeline.finetune.options import resolve_options
    from pipeline.finetune.trainer import Trainer
    from pipeline.heads.estimators import build_head_module
    from pipeline.images.reader import DecodedBatch

    bb = load_backbone("timm:legacy_seresnet18", "none")
    torch.manual_seed(0)
    model, thawed, _ = assemble(bb, build_head_module(bb.embed_dim, 2, (), ()), "all", 2, seed=0)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    batches = [DecodedBatch(list(range(4 * b, 4 * b + 4)), torch.randn(4, 3, 64, 64, generator=g), [""] * 4, []) for b in range(2)]
    trainer = Trainer(model, resolve_options({"epochs": 1, "warmup": 0.0, "lr_backbone": 0.05, "clip_grad": 0.0}), torch.device("cpu"), np.arange(8) % 2)
    assert trainer.train_epoch(batches, epoch=0, total_epochs=1).images == 8
    after = model.state_dict()
    bns = batchnorm_layers(model)
    bn_keys = [f"{n}.{k}" for n, m in bns for k in list(dict(m.named_parameters(recurse=False))) + list(dict(m.named_buffers(recurse=False)))]
    assert len(bns) == 20 and len(bn_keys) == 5 * 20 and not any(m.training for _, m in bns)
    assert all(torch.equal(before[k], after[k]) for k in bn_keys)
    assert not torch.equal(before["backbone.layer4.1.conv2.weight"], after["backbone.layer4.1.conv2.weight"])
    assert not torch.equal(before["backbone.layer4.1.se_module.fc1.weight"], after["backbone.layer4.1.se_module.fc1.weight"])


def test_timm_batchnormact_is_frozen_and_layernorm_trains():
    """timm's BatchNormAct2d (BatchNorm + activation in one module) is frozen like nn.BatchNorm2d; LayerNorm models train normally."""
    from pipeline.finetune.freezing import batchnorm_layers, freeze_batchnorm
    from pipeline.finetune.model import assemble
    from pipeline.heads.estimators import build_head_module

    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    kinds = {type(m).__name__ for _, m in batchnorm_layers(model)}
    assert "BatchNormAct2d" in kinds
    model.train()
    freeze_batchnorm(model)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 64, 64)).pow(2).sum().backward()
    opt.step()
    after = model.state_dict()
    bn = [f"{n}.{k}" for n, m in batchnorm_layers(model) for k in dict(list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)))]
    assert bn and all(torch.equal(before[k], after[k]) for k in bn)
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])

    bb = load_backbone("timm:convnext_atto", "none")
    net, _, _ = assemble(bb, build_head_module(bb.embed_dim, 2, (), ()), "all", 2, seed=0)
    norms = [p for n, p in net.named_parameters() if ".norm" in n]
    assert norms and all(p.requires_grad for p in norms)


def test_models_lists_sources_with_width_and_input_size():
    from pipeline.backbones.catalog import list_backbones
    from pipeline.errors import UsageError

    rows = {r["name"]: r for r in list_backbones("timm", "convnext_atto")[0]}
    assert rows["timm:convnext_atto"]["embed_dim"] == 320 and rows["timm:convnext_atto"]["input_size"] == 224
    assert list_backbones("pretrainedmodels", "se_resnet50")[0][0]["embed_dim"] == 2048
    rows, notes = list_backbones(None, "")
    assert len(rows) > 1000 and "embed_dim" not in rows[0] and "add --filter" in notes[-1]  # too many to build: names only
    with pytest.raises(UsageError, match="torchvision, timm, pretrainedmodels"):
        list_backbones("keras")
    p = run_cli("models", "--filter", "resnet18")  # as users see it
    assert p.returncode == 0 and "resnet18" in p.stdout and "512-d" in p.stdout and "224 px" in p.stdout


def test_hub_cache_dir_env_is_respected_by_pretrainedmodels_message(tmp_path):
    """pretrainedmodels DEFAULT offline: exit 6 naming the file expected in the torch hub cache."""
    pytest.importorskip("pretrainedmodels", reason="the pretrainedmodels extra is not installed")
    data = tmp_path / "data"
    make_image(data / "a" / "0.png")
    p = run_cli("extract", str(data), "-m", "pretrainedmodels:bninception", "--out", str(tmp_path / "c.h5"), env={"TORCH_HOME": str(tmp_path / "th")})
    assert p.returncode == 6, p.stderr
    assert "bn_inception-52deb4733.pth" in p.stderr and str(tmp_path / "th") in p.stderr
    assert os.listdir(tmp_path) == ["data"] or not (tmp_path / "c.h5").exists()


def test_importing_the_pipeline_does_not_import_timm_or_pretrainedmodels():
    """`featcache` starts without timm/pretrainedmodels: they are imported only for their models."""
    code = "import sys, pipeline.backbones, pipeline.extract; print('timm' in sys.modules, 'pretrainedmodels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert out == "False False"
