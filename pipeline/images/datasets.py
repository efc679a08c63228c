"""Datasets already on disk: ``torchvision:CIFAR10:/data/cifar10`` as an image source.

Any ``torchvision.datasets`` class that reads local files is built with ``download=False``
(never a download) for each of its splits (``train=True/False``, or ``split=`` train,
trainval, val, test); rows are keyed ``<split>/<index>`` and carry the SHA-256 of the image's
lossless PNG encoding as their content hash. Their fingerprint is the dataset folder's
newest file, so a changed dataset is extracted again. Decoder processes build the dataset
once each and read items by index.
"""
from __future__ import annotations

import inspect
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import DataError
from .folders import UNLABELED, ImageRecord, ScanResult

PREFIX = "torchvision:"
# the split names datasets use, as this project names splits ("" keeps the row out of a split)
_SPLITS = {"train": "train", "trainval": "train", "val": "val", "valid": "val", "test": "test"}


def is_dataset_spec(source: str | os.PathLike) -> bool:
    return str(source).startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, Path]:
    """``torchvision:NAME:ROOT`` -> (class name, root folder)."""
    _, name, root = (str(spec).split(":", 2) + ["", ""])[:3]
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not name or not root or not inspect.isclass(cls):
        known = sorted(n for n in dir(tvd) if inspect.isclass(getattr(tvd, n)) and "download" in inspect.signature(getattr(tvd, n).__init__).parameters)
        raise DataError(f"{spec!r}: write torchvision:NAME:ROOT with NAME a torchvision dataset (e.g. {', '.join(known[:8])}, …)")
    if "download" not in inspect.signature(cls.__init__).parameters:
        raise DataError(f"{spec!r}: {name} is not one of torchvision's downloadable datasets; pass its folder as DATA instead")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{spec!r}: dataset folder {str(path)!r} does not exist; pass the folder it was downloaded to")
    return name, path.resolve()


def _split_args(cls: type) -> list[tuple[str, dict[str, Any]]]:
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return [("train", {"train": True}), ("test", {"train": False})]
    if "split" in params:
        return [(ours, {"split": theirs}) for theirs, ours in _SPLITS.items()]
    return [("", {})]


@lru_cache(maxsize=8)
def open_split(name: str, root: str, split_kwargs: tuple) -> Any:
    """The dataset object of one split (cached per process: decoders build it once)."""
    import torchvision.datasets as tvd

    return getattr(tvd, name)(root, download=False, **dict(split_kwargs))


def read_item(container: str, index: int) -> bytes:
    """Item ``index`` of ``container`` (``torchvision:NAME:ROOT|k=v``) as lossless PNG bytes."""
    spec, _, kwargs = container.partition("|")
    _, name, root = spec.split(":", 2)
    split_kwargs = tuple((k, v == "True" if v in ("True", "False") else v) for k, v in (kv.split("=", 1) for kv in kwargs.split(",") if kv))
    image = open_split(name, root, split_kwargs)[index][0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _newest_mtime(root: Path) -> int:
    newest = 0
    for folder, _, files in os.walk(root):
        for f in files:
            try:
                newest = max(newest, os.stat(os.path.join(folder, f)).st_mtime_ns)
            except OSError:
                continue
    return newest


def scan_dataset(spec: str) -> ScanResult:
    """Every item of every split of a local torchvision dataset, as records read by index.

    Raises:
        DataError: not a torchvision dataset, or its files are not in the folder (never downloads).
    """
    name, root = parse_spec(spec)
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    records: list[ImageRecord] = []
    classes: list[str] = []
    errors: list[str] = []
    mtime = _newest_mtime(root)
    for split, kwargs in _split_args(cls):
        key = tuple(sorted(kwargs.items()))
        try:
            ds = open_split(name, str(root), key)
        except (RuntimeError, OSError, ValueError) as exc:  # "Dataset not found or corrupted", an unknown split name
            errors.append(f"{split or 'all'}: {str(exc).splitlines()[0][:120]}")
            continue
        names = [str(c) for c in getattr(ds, "classes", [])]
        classes = classes or names
        targets = next((t for t in (getattr(ds, a, None) for a in ("targets", "labels", "_labels")) if t is not None), None)
        container = f"{PREFIX}{name}:{root}|" + ",".join(f"{k}={v}" for k, v in key)
        for i in range(len(ds)):
            label = int(targets[i]) if targets is not None else UNLABELED
            records.append(ImageRecord(f"{split or 'all'}/{i:07d}", label, split if split in ("train", "val", "test") else "", 0, mtime, container, i))
    if not records:
        raise DataError(f"{spec!r}: no {name} files found in {str(root)!r} ({'; '.join(errors)}); download it there first "
                        f"(torchvision.datasets.{name}(root, download=True)) — featcache never downloads")
    if not classes and any(r.label >= 0 for r in records):
        classes = [str(i) for i in range(max(r.label for r in records) + 1)]
    return ScanResult(root, "torchvision", classes, records, [], spec=f"{PREFIX}{name}:{root}")
