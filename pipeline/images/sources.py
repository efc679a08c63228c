"""Any image source in, records out: the one entry point stages call.

Decides by what ``source`` is (or by the layout a cache recorded): a ``torchvision:`` or
``hf:`` dataset spec, a manifest file, WebDataset tar shards, or an image folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .datasets import is_dataset_spec, scan_dataset
from .folders import ScanResult, scan_folder
from .hf import is_hf_spec, scan_hf
from .manifests import MANIFEST_SUFFIXES, ManifestColumns, is_manifest, scan_manifest
from .shards import is_shards, scan_shards


def scan_source(source: str | os.PathLike, layout: str = "auto", columns: ManifestColumns | dict[str, str] | None = None,
                shard_index: Path | None = None) -> ScanResult:
    """A dataset spec (``scan_dataset``, ``scan_hf``), a manifest file (``scan_manifest``),
    WebDataset tar shards (``scan_shards``, their member lists remembered in ``shard_index``)
    or a folder (``scan_folder``), by what ``source`` is."""
    if isinstance(columns, dict):
        columns = ManifestColumns(**columns)
    if layout == "torchvision" or is_dataset_spec(source):
        return scan_dataset(str(source))
    if layout == "hf" or is_hf_spec(source):
        return scan_hf(str(source))
    if layout == "manifest" or is_manifest(source):
        return scan_manifest(source, columns)
    if layout == "shards" or is_shards(source):
        return scan_shards(source, shard_index)
    if Path(source).expanduser().is_file():
        raise DataError(f"{str(source)!r} is a file but not a manifest; pass an image folder, a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                        "or tar shards ('shards/train-{000000..000127}.tar')")
    return scan_folder(source, layout)
