"""Training images for stage 3: augmentation at the model's own input size and
normalisation, seeded per image and epoch (identical for any number of workers, and after a
resume), and the per-epoch order torchrun ranks share."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..backbones import Preprocessing
from ..images import ImageFileDataset, ImageRecord

# ----------------------------------------------------------------------------- data


def train_transform(pre: Preprocessing, preset: str) -> Callable:
    """Augmentation at the model's own input size and normalisation (from its weights)."""
    if preset == "none":
        return pre.transform()
    interpolation = InterpolationMode(pre.interpolation)
    if preset == "light":  # no flip, no tiny crops: for digits, text and other orientation-bound images
        ops: list[Any] = [T.RandomResizedCrop(pre.input_size, scale=(0.5, 1.0), interpolation=interpolation, antialias=True)]
    else:
        ops = [T.RandomResizedCrop(pre.input_size, interpolation=interpolation, antialias=True), T.RandomHorizontalFlip()]
    if preset == "rotate":
        ops.append(T.RandomRotation(15, interpolation=InterpolationMode.BILINEAR))
    elif preset == "strong":
        ops.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    return T.Compose([*ops, T.PILToTensor(), pre.normalize])  # the model's own range, channel order, mean and std


class AugmentedDataset(ImageFileDataset):
    """Each image's augmentation is seeded by (seed, epoch, index): identical whatever the
    number of workers, and again after a resume."""

    def __init__(self, root: Path, records: list[ImageRecord], transform: Callable, seed: int):
        super().__init__(root, records, transform, hash_files=False)
        self.seed, self.epoch = seed, 0

    def preprocess(self, i: int, image) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
            return self.transform(image)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's items for one epoch, exactly as torch's ``DistributedSampler`` (shuffled by
    seed + epoch via ``set_epoch``, padded to equal shares) deals them — one rule for any
    number of ranks, so 2 ranks x batch B see the same images per step as 1 rank x batch 2B."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)
