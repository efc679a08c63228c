"""The registry: every family's embedding is the input of its final classification layer."""
from __future__ import annotations

import textwrap
import urllib.error

import pytest
import torch
import torchvision

from pipeline.backbones.registry import load_backbone
from pipeline.errors import BackboneError, WeightsUnavailableError

# (model, input size for the check, expected embedding width)
FAMILIES = [
    ("resnet18", 64, 512),
    ("resnet50", 64, 2048),
    ("resnext50_32x4d", 64, 2048),
    ("vgg11", 64, 4096),
    ("alexnet", 64, 4096),
    ("squeezenet1_0", 64, 512),
    ("densenet121", 64, 1024),
    ("inception_v3", 96, 2048),
    ("googlenet", 64, 1024),
    ("shufflenet_v2_x0_5", 64, 1024),
    ("mobilenet_v2", 64, 1280),
    ("mobilenet_v3_large", 64, 1280),
    ("mnasnet0_5", 64, 1280),
    ("efficientnet_b0", 64, 1280),
    ("regnet_y_400mf", 64, 440),
    ("convnext_tiny", 64, 768),
    ("vit_b_16", 224, 768),
    ("swin_t", 224, 768),
    ("maxvit_t", 224, 512),
]


def _reference(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def _final_layer(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The classification layer as each family's torchvision source names it (independent of ours)."""
    if name.startswith(("vgg", "alexnet", "mobilenet", "efficientnet", "mnasnet", "convnext", "maxvit")):
        return model.classifier[-1]
    if name.startswith("squeezenet"):
        return model.classifier[1]
    if name.startswith("densenet"):
        return model.classifier
    if name.startswith("vit"):
        return model.heads.head
    if name.startswith("swin"):
        return model.head
    return model.fc


@pytest.mark.parametrize("name,size,dim", FAMILIES)
def test_embedding_is_input_of_final_layer(name, size, dim):
    seen = {}
    ref = _reference(name, seed=3)
    _final_layer(name, ref).register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref(x)
        backbone = load_backbone(name, "none", seed=3)
        ours = backbone.model(x)
    expected = seen["x"]
    if name.startswith("squeezenet"):  # a 1x1 conv classifier: the embedding is its pooled input
        expected = expected.mean(dim=(2, 3))
    assert backbone.embed_dim == dim
    assert ours.shape == (2, dim)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_preprocessing_comes_from_the_weights():
    inc = load_backbone("inception_v3", "none")
    assert inc.preprocessing.crop_size == [299] and inc.preprocessing.resize_size == [342]
    r50 = load_backbone("resnet50", "none").preprocessing
    ref = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    assert (r50.crop_size, r50.resize_size, r50.mean, r50.std) == (ref.crop_size, ref.resize_size, ref.mean, ref.std)


def test_unknown_model_suggests_close_matches():
    with pytest.raises(BackboneError, match="did you mean.*resnet50"):
        load_backbone("resnet5O")


def test_bad_weights_name_lists_choices():
    with pytest.raises(BackboneError, match="IMAGENET1K_V2"):
        load_backbone("resnet50", "IMAGENET_V9")


def test_default_weights_offline_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone("resnet18", "DEFAULT")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights none" in msg
    assert "\n" not in msg


def test_default_weights_load_from_local_hub_cache(tmp_path, monkeypatch):
    """DEFAULT resolves through the torch hub cache: a file there is used, no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = _reference("resnet18", seed=7)
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    bb = load_backbone("resnet18", "DEFAULT")
    assert bb.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    x = torch.randn(1, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), ref(x))


def test_state_dict_path(tmp_path):
    ref = _reference("resnet18", seed=11)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    bb = load_backbone("resnet18", str(path))
    assert bb.weights_id.startswith("file:sha256=") and bb.seed is None
    ref.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), ref(x))


def test_state_dict_of_other_architecture_refused(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(_reference("resnet18", 0).state_dict(), path)
    with pytest.raises(BackboneError, match="does not match the architecture"):
        load_backbone("resnet50", str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="no such file"):
        load_backbone("resnet18", str(tmp_path / "nope.pt"))


def test_local_torch_hub_entry(tmp_path):
    (tmp_path / "hubconf.py").write_text(textwrap.dedent('''
        import torch
        dependencies = ["torch"]

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
                self.fc = torch.nn.Linear(6, 10)
            def forward(self, x):
                return self.fc(self.features(x))

        def tiny(pretrained=False):
            m = Tiny()
            m.featcache_preprocessing = {"resize_size": [40], "crop_size": [32]}
            return m
    '''))
    bb = load_backbone(f"hub:{tmp_path}:tiny", "none")
    assert bb.embed_dim == 6 and bb.removed_layer == "fc"
    assert bb.preprocessing.crop_size == [32] and bb.preprocessing.source == "hub entry"
    with pytest.raises(BackboneError, match="cannot load torch.hub entry"):
        load_backbone(f"hub:{tmp_path}:nope", "none")
