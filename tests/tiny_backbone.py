"""A tiny BatchNorm conv net as a local torch.hub entry (``hub:DIR:tinybn``, 32-px input):
the tests and bench/faults.py run every stage on it in seconds. No pytest import, so the
bench can use it too."""
from __future__ import annotations

from pathlib import Path

TINY_BN_HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


def _stage(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyBN(nn.Module):
    """A small conv net with BatchNorm: fine-tuning tests in seconds on CPU."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _stage(3, 8, 1)
        self.layer1 = _stage(8, 16, 2)
        self.layer2 = _stage(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def tinybn(pretrained=False):
    m = TinyBN()
    m.featcache_preprocessing = {"resize_size": [36], "crop_size": [32]}
    return m
'''


def write_tiny_hub(folder: Path) -> str:
    """Write the hub entry into ``folder``; the ``--model`` value that names it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(TINY_BN_HUBCONF)
    return f"hub:{folder}:tinybn"
