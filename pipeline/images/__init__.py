"""Images in: folders scanned into records (ImageFolder's classes and order, pre-split
``train/ val/ test/`` roots, flat unlabeled folders) and manifests (CSV, TSV, JSON lines,
Parquet), robust decoding (CPU, draft, GPU), and
the batch reader that decodes in worker processes and records every file that failed.

Never runs model code and never substitutes one file for another.
"""
from .datasets import is_dataset_spec
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, load_image, retry_under
from .feeder import DeviceFeeder
from .folders import LAYOUTS, ImageRecord, ScanFailure, ScanResult, scan_folder
from .gpu_decode import check_gpu_decode, open_gpu_decoder
from .hf import is_hf_spec
from .manifests import MANIFEST_SUFFIXES, ManifestColumns, is_manifest, scan_manifest
from .reader import (
    DecodedBatch,
    ImageFileDataset,
    SharedDecodeDataset,
    collate_shared,
    content_digests,
    default_workers,
    finish_on_gpu,
    make_loader,
    read_bytes,
    read_record,
)
from .shards import expand_shards, is_shards, scan_shards
from .sources import scan_source

__all__ = ["DEFAULT_MAX_PIXELS", "LAYOUTS", "DecodeError", "DecodedBatch", "ImageFileDataset", "ImageRecord", "ScanFailure", "ScanResult", "SharedDecodeDataset",
           "DeviceFeeder", "check_gpu_decode", "open_gpu_decoder", "collate_shared", "content_digests", "decode_image", "default_workers", "finish_on_gpu", "load_image", "make_loader", "read_bytes", "read_record",
           "is_dataset_spec", "is_hf_spec",
           "retry_under", "scan_folder",
           "MANIFEST_SUFFIXES", "ManifestColumns", "is_manifest", "scan_manifest", "scan_source",
           "expand_shards", "is_shards", "scan_shards"]
