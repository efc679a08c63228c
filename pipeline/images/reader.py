"""Stage 1's reader: files -> bytes, SHA-256, decoded and preprocessed batches, in decoder processes.

A file that cannot be read or decoded becomes a recorded failure of its batch, never a
substitute image. Several backbones share one read and decode (``SharedDecodeDataset``);
``--decode gpu`` leaves plain JPEGs to nvJPEG (``finish_on_gpu``).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, read_bytes, read_member
from .folders import ImageRecord
from .gpu_decode import Encoded, GpuJpegDecoder, pixels_on_gpu, plain_jpeg


@dataclass
class DecodedBatch:
    positions: list[int]  # indices into the job's record list, for the decoded images
    images: torch.Tensor | None  # [B, 3, H, W] (float32, or uint8 pixels in extraction), or None when none decoded
    sha256: list[str]
    failures: list[tuple[int, str]]  # (record index, reason)
    # --decode gpu: JPEGs still to decode, as (record index, sha256), and where their bytes lie in
    # ``jpeg_bytes``: one tensor per batch shared by every backbone's part (one shared-memory
    # transfer per batch from a decoder process, not one per file or per backbone)
    encoded: list[tuple[int, str]] = field(default_factory=list)
    jpeg_bytes: torch.Tensor | None = None
    jpeg_spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) per ``encoded`` entry

    def jpegs(self) -> dict[int, torch.Tensor]:
        """{record index: that JPEG's bytes} (views into ``jpeg_bytes``)."""
        if self.jpeg_bytes is None:
            return {}
        return {i: self.jpeg_bytes.narrow(0, start, length) for (i, _), (start, length) in zip(self.encoded, self.jpeg_spans)}

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locked images copy asynchronously."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def read_record(root: Path, rec: ImageRecord) -> bytes:
    """A record's image bytes: a file, a member of a tar shard, or an item of a torchvision dataset."""
    if not rec.container:
        return read_bytes(root / rec.relpath)
    if rec.container.startswith(("torchvision:", "hf:")):
        from . import datasets, hf

        try:
            return (hf if rec.container.startswith("hf:") else datasets).read_item(rec.container, rec.offset)
        except Exception as exc:  # noqa: BLE001 - whatever the dataset class raises for one item
            raise DecodeError(f"cannot read item {rec.offset} of {rec.container.partition('|')[0]}: {type(exc).__name__}: {exc}") from None
    return read_member(root / rec.container, rec.offset, rec.size, rec.mtime_ns)


POOL_MIN_BYTES = 64 << 10  # mean file size from which hashing in threads pays (measured below)


def hash_threads(records: Sequence[ImageRecord]) -> int:
    """Threads for hashing ``records``: one per usable core when their files average 64 KiB or
    more, else 1. File reads and hashlib (above 2 KiB) release the GIL, but each file also costs
    Python work that holds it: on 2 cores with the files in the page cache, 2 threads hashed
    128 KiB files in 0.63x the time of 1 thread and 64 KiB in 0.80x, but 32 KiB in 1.2x and
    16 KiB in 1.5x (bench/incremental.py's files, 64 MiB each)."""
    mean = sum(r.size for r in records) / max(1, len(records))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)) if mean >= POOL_MIN_BYTES else 1


def content_digests(root: Path, records: Sequence[ImageRecord], threads: int | None = None, chunk: int = 64) -> list[bytes | None]:
    """The SHA-256 of each record's bytes, exactly as the decoder processes hash them when they
    extract it (None: it cannot be read now), without decoding; in a thread pool of ``threads``
    (default ``hash_threads``)."""
    root = Path(root)
    threads = threads or hash_threads(records)
    if threads == 1:
        return _digest_chunk(root, records)
    parts = [records[a : a + chunk] for a in range(0, len(records), chunk)]
    with ThreadPoolExecutor(threads) as pool:
        return [d for part in pool.map(lambda recs: _digest_chunk(root, recs), parts) for d in part]


def _digest_chunk(root: Path, records: Sequence[ImageRecord]) -> list[bytes | None]:
    """One thread's share; a shard is opened once per share (members come shard by shard)."""
    shards: dict[str, int] = {}
    try:
        return [_digest(root, r, shards) for r in records]
    finally:
        for fd in shards.values():
            os.close(fd)


def _digest(root: Path, rec: ImageRecord, shards: dict[str, int]) -> bytes | None:
    try:
        if not rec.container:
            with open(root / rec.relpath, "rb") as fh:  # whole, as the decoder reads it (file_digest's 256 KiB buffer per file costs more)
                return hashlib.sha256(fh.read()).digest()
        if rec.container.startswith(("torchvision:", "hf:")):
            return hashlib.sha256(read_record(root, rec)).digest()
        if rec.container not in shards:
            shards[rec.container] = os.open(root / rec.container, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        data = os.pread(shards[rec.container], rec.size, rec.offset)
        return hashlib.sha256(data).digest() if len(data) == rec.size else None
    except (OSError, DecodeError):
        return None


class ImageFileDataset(Dataset):
    """Reads, hashes and decodes one file per item; never substitutes a failed file.

    ``hash_files=False`` skips the SHA-256 (training and prediction do not record it);
    subclasses change how a decoded image becomes a tensor by overriding ``preprocess``,
    or what becomes of a file's bytes by overriding ``prepare``.
    """

    def __init__(self, root: Path, records: Sequence[ImageRecord], transform: Callable, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 hash_files: bool = True, draft_size: int | None = None):
        self.root = Path(root)
        self.records = list(records)
        self.transform = transform
        self.max_pixels = max_pixels
        self.hash_files = hash_files
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.records)

    def preprocess(self, i: int, image) -> torch.Tensor:
        return self.transform(image)

    def prepare(self, i: int, data: bytes):
        return self.preprocess(i, decode_image(data, self.max_pixels, self.draft_size))

    def __getitem__(self, i: int) -> tuple[int, Any, str]:
        try:
            data = read_record(self.root, self.records[i])
            sha = hashlib.sha256(data).hexdigest() if self.hash_files else ""
            return i, self.prepare(i, data), sha
        except DecodeError as exc:
            return i, None, f"!{exc}"
        except Exception as exc:  # a transform failure on a pathological image: record, do not stop
            return i, None, f"!cannot preprocess: {type(exc).__name__}: {exc}"


def pack_jpegs(items: list[tuple[int, Any, str]]) -> tuple[torch.Tensor | None, dict[int, tuple[int, int]]]:
    """Every undecoded JPEG of a batch in one uint8 tensor, and {record index: (offset, length)}."""
    spans: dict[int, tuple[int, int]] = {}
    chunks, offset = [], 0
    for i, t, _ in items:
        if isinstance(t, Encoded):
            spans[i] = (offset, len(t.data))
            chunks.append(t.data)
            offset += len(t.data)
    return (torch.cat(chunks) if chunks else None), spans


def collate_decoded(items: list[tuple[int, Any, str]], packed: tuple[torch.Tensor | None, dict[int, tuple[int, int]]] | None = None) -> DecodedBatch:
    """One backbone's batch; ``packed`` (``pack_jpegs`` of the whole batch) is shared by every
    backbone's part, else the part packs its own JPEGs."""
    ok = [(i, t, s) for i, t, s in items if t is not None and not isinstance(t, Encoded)]
    failures = [(i, s[1:]) for i, t, s in items if t is None]
    images = torch.stack([t for _, t, _ in ok]) if ok else None
    jpeg_bytes, spans = packed if packed is not None else pack_jpegs(items)
    jpegs = [(i, s) for i, t, s in items if isinstance(t, Encoded)]
    return DecodedBatch([i for i, _, _ in ok], images, [s for _, _, s in ok], failures, jpegs,
                        jpeg_bytes if jpegs else None, [spans[i] for i, _ in jpegs])


class SharedDecodeDataset(ImageFileDataset):
    """One read and decode per file for several backbones: item ``i`` is transformed by each
    backbone's own preprocessing that needs it (``needs[i][k]``), ``None`` for the others.
    Extraction passes ``Preprocessing.pixels()`` here and normalises on the engine's device.
    With ``gpu_decode`` a plain JPEG is passed on undecoded (``Encoded``) for nvJPEG."""

    def __init__(self, root: Path, records: Sequence[ImageRecord], transforms: Sequence[Callable], needs: Sequence[Sequence[bool]],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_size: int | None = None, gpu_decode: bool = False, hash_files: bool = True):
        super().__init__(root, records, transforms[0], max_pixels, hash_files=hash_files, draft_size=draft_size)
        self.transforms = list(transforms)
        self.needs = needs
        self.gpu_decode = gpu_decode

    def preprocess(self, i: int, image) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return tuple(t(image) if need else None for t, need in zip(self.transforms, self.needs[i]))

    def prepare(self, i: int, data: bytes):
        if self.gpu_decode and plain_jpeg(data, self.max_pixels):
            return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return super().prepare(i, data)


def collate_shared(items: list[tuple[int, Any, str]], needs: Sequence[Sequence[bool]]) -> list[DecodedBatch]:
    """One ``DecodedBatch`` per backbone from ``SharedDecodeDataset`` items; a file that failed
    to decode is a failure for every backbone that needed it, an undecoded JPEG goes to each."""
    pick = lambda t, k: t if t is None or isinstance(t, Encoded) else t[k]  # noqa: E731
    packed = pack_jpegs(items)
    return [collate_decoded([(i, pick(t, k), s) for i, t, s in items if needs[i][k]], packed) for k in range(len(needs[items[0][0]]))]


def finish_on_gpu(parts: list[DecodedBatch], to_pixels: Sequence[Callable[[torch.Tensor], torch.Tensor]], decoder: GpuJpegDecoder) -> None:
    """--decode gpu: decode each batch's JPEGs once on the GPU, then resize and crop them with
    every backbone's own preprocessing; they join the batch's CPU-decoded pixels."""
    encoded = {i: data for part in parts for i, data in part.jpegs().items()}
    if not encoded:
        return
    decoded, failed = decoder.decode(encoded)
    device = decoder.device
    for part, pixels_of in zip(parts, to_pixels):
        keep = [(i, sha) for i, sha in part.encoded if i in decoded]
        part.failures += [(i, failed[i]) for i, _ in part.encoded if i in failed]
        part.encoded, part.jpeg_bytes, part.jpeg_spans = [], None, []
        if not keep:
            continue
        pixels = pixels_on_gpu(decoded, [i for i, _ in keep], pixels_of)
        if part.images is not None:
            pixels = torch.cat([part.images.to(device, non_blocking=True), pixels])
        part.images = pixels
        part.positions += [i for i, _ in keep]
        part.sha256 += [sha for _, sha in keep]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoders must not fight the backbone for cores


def default_workers(device_type: str = "cpu") -> int:
    """Decoder processes. On a CPU with 2 cores or fewer, none: the engine already uses every
    core, and a decoder process beside it slows the whole run (bench/extract.py, data path:
    resnet50 on ONNX Runtime, 2 cores: 0 workers 44 img/s, 1 worker 40). With more cores a
    quarter of them decode; the engine keeps all its threads: giving it one core less cost
    more than the decoders' contention (26 vs 40). On CUDA the CPU has nothing else to do:
    every core but one decodes (the one left runs the main thread, which feeds the GPU and
    writes the cache). Measured with bench/extract.py --device cuda on an H200 with 16 cores,
    resnet50 fp32, exact decoding: 8 decoders 1,054 img/s, 12: 1,687, 15: 1,767 (the rate still
    grew at 15, so no fewer); at most 32, a bound not measured beyond. Under torchrun the
    node's cores are shared by its ranks."""
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, (os.cpu_count() or 2) // ranks_here)
    if device_type == "cuda":
        return max(1, min(32, cores - 1))
    if cores <= 2:
        return 0
    return max(1, min(8, cores // 4))


def make_loader(dataset: ImageFileDataset, batch_size: int, workers: int, pin_memory: bool, sampler: Sequence[int] | None = None,
                collate: Callable = collate_decoded, prefetch: int = 4) -> DataLoader:
    """Batches of decoded images; ``sampler`` gives the item order (default: in order);
    each worker decodes ``prefetch`` whole batches ahead."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),  # worker seeds must not consume the global RNG (resume stays bit-exact)
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=prefetch if workers > 0 else None,
    )
