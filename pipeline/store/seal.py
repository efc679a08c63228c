"""Sealed HDF5 files: every byte HDF5's parser reads is checked before it reads it.

HDF5 checks data chunks (Fletcher-32) and, in its latest format, most of its own metadata,
but not all of it: variable-length strings (every attribute h5py writes from a ``str``, such
as a part's ``meta_json`` with its class names) live in the *global heap*, which carries no
checksum, so one flipped bit there read back as other class names; and some flips sent the
parser into an endless loop inside C, where no signal handler runs. So every file the store
writes carries a seal, and no byte reaches h5py (or ``json``) before the seal matches:

* bytes 0-511 are an HDF5 *user block* (HDF5 skips it, so plain h5py still opens the file)
  holding the seal as text: the SHA-256 of the *frame*, the SHA-256 of everything after the
  seal (*content*), and where the chunk list lies;
* after HDF5's last byte, the *chunk list*: the byte ranges of the data chunks, each of which
  HDF5 checks with Fletcher-32 before it decodes it (a chunk is read, never parsed);
* the *frame* is every other byte: superblock, object headers, attributes, the global heap,
  chunk indexes, plus the chunk list itself — everything the parser walks. It is kilobytes
  to a few megabytes whatever the part's size, so it is checked on every open (an
  incremental run over a 10 M-row cache must not hash 80 GB of embeddings before it can
  embed one new image), while checking every byte (*content*) is ``verify``'s job.

A manifest has no chunk list (its frame is the whole file): it is small, read whole, and
parsed from the very bytes that were checked. Files written before seals existed start
with HDF5's own signature; they are read as before (a listed part is checked against the
whole-file SHA-256 its manifest recorded).
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SEAL_BYTES = 512  # the HDF5 user block (a power of two >= 512)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SEAL_MAGIC = b"featcache-seal 1\n"
CHUNKS_MAGIC = b"featcache-chunks 1\n"
_SEAL_TEXT = re.compile(rb"featcache-seal 1\nframe ([0-9a-f]{64})\ncontent ([0-9a-f]{64})\nchunks ([0-9]{1,20}) ([0-9]{1,20})\n")
_BLOCK = 8 << 20


class SealError(Exception):
    """The file's bytes are not what was sealed (the caller names the file)."""


@dataclass(frozen=True)
class Seal:
    frame: str  # SHA-256 of the frame (what the parser reads) and the chunk list
    content: str  # SHA-256 of every byte after the seal
    chunks_at: int  # where the chunk list starts (HDF5's end of file)
    chunks_len: int


def seal_text(seal: Seal) -> bytes:
    text = SEAL_MAGIC + b"frame %s\ncontent %s\nchunks %d %d\n" % (seal.frame.encode(), seal.content.encode(), seal.chunks_at, seal.chunks_len)
    return text.ljust(SEAL_BYTES, b"\0")


def is_sealed(head: bytes) -> bool:
    """Whether a file's first bytes are a seal (else it is a plain HDF5 file written before seals, or foreign)."""
    return head.startswith(SEAL_MAGIC)


def parse_seal(head: bytes, size: int) -> Seal:
    """The seal in ``head`` (the file's first 512 bytes), checked byte for byte."""
    match = _SEAL_TEXT.match(head)
    if len(head) < SEAL_BYTES or match is None:
        raise SealError("its seal (the first 512 bytes) is damaged")
    seal = Seal(match.group(1).decode(), match.group(2).decode(), int(match.group(3)), int(match.group(4)))
    if seal_text(seal) != head[:SEAL_BYTES]:
        raise SealError("its seal (the first 512 bytes) is damaged")
    if seal.chunks_at < SEAL_BYTES or seal.chunks_at + seal.chunks_len != size:
        raise SealError(f"{size:,} bytes on disk, the seal says {seal.chunks_at + seal.chunks_len:,} (truncated or appended to)")
    return seal


def chunk_list_bytes(ranges: np.ndarray) -> bytes:
    return CHUNKS_MAGIC + struct.pack("<Q", len(ranges)) + np.ascontiguousarray(ranges, dtype="<u8").tobytes()


def parse_chunk_list(data: bytes, seal: Seal) -> np.ndarray:
    """``[k, 2]`` (offset, length) of the data chunks: sorted, disjoint, inside the HDF5 file."""
    head = len(CHUNKS_MAGIC) + 8
    if len(data) < head or not data.startswith(CHUNKS_MAGIC):
        raise SealError("its chunk list is damaged")
    (count,) = struct.unpack("<Q", data[len(CHUNKS_MAGIC) : head])
    if len(data) != head + 16 * count:
        raise SealError("its chunk list is damaged")
    ranges = np.frombuffer(data, dtype="<u8", offset=head).reshape(-1, 2).astype(np.int64)
    if len(ranges):
        starts, ends = ranges[:, 0], ranges[:, 0] + ranges[:, 1]
        if starts[0] < SEAL_BYTES or ends[-1] > seal.chunks_at or (ranges[:, 1] <= 0).any() or (starts[1:] < ends[:-1]).any():
            raise SealError("its chunk list is damaged")
    return ranges


def frame_spans(ranges: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
    """The byte spans of ``[start, end)`` outside ``ranges`` (sorted and disjoint)."""
    spans, at = [], start
    for a, n in ranges.tolist():
        if a > at:
            spans.append((at, a))
        at = max(at, a + n)
    if end > at:
        spans.append((at, end))
    return spans


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    """(offset, length) pairs sorted, with touching ranges joined (chunks are mostly written back to back)."""
    out: list[list[int]] = []
    for a, n in sorted(r for r in ranges if r[1] > 0):
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][0] + out[-1][1], a + n) - out[-1][0]
        else:
            out.append([a, n])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _read(fd: int, start: int, end: int) -> Iterable[bytes]:
    at = start
    while at < end:
        block = os.pread(fd, min(_BLOCK, end - at), at)
        if not block:
            raise SealError(f"it ends at byte {at:,}, before its sealed end {end:,} (truncated)")
        yield block
        at += len(block)


def write_seal(fd: int, hdf5_end: int, ranges: np.ndarray) -> Seal:
    """Seal the HDF5 file open on ``fd`` (written with a ``SEAL_BYTES`` user block, ``hdf5_end``
    bytes long): append the chunk list, hash in one pass, write the seal, cut the file there."""
    chunk_list = chunk_list_bytes(ranges)
    _pwrite_all(fd, chunk_list, hdf5_end)
    os.ftruncate(fd, hdf5_end + len(chunk_list))
    frame, content = hashlib.sha256(), hashlib.sha256()
    spans = frame_spans(ranges, SEAL_BYTES, hdf5_end)
    k = 0
    at = SEAL_BYTES
    for block in _read(fd, SEAL_BYTES, hdf5_end):
        content.update(block)
        lo, hi = at, at + len(block)
        while k < len(spans) and spans[k][0] < hi:
            a, b = max(spans[k][0], lo), min(spans[k][1], hi)
            if a < b:
                frame.update(memoryview(block)[a - lo : b - lo])
            if spans[k][1] <= hi:
                k += 1
            else:
                break
        at = hi
    frame.update(chunk_list)
    content.update(chunk_list)
    seal = Seal(frame.hexdigest(), content.hexdigest(), hdf5_end, len(chunk_list))
    _pwrite_all(fd, seal_text(seal), 0)
    return seal


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_seal(fd: int, size: int) -> Seal | None:
    """The seal of the file on ``fd``, or None for a plain HDF5 file written before seals.

    Raises:
        SealError: neither (a damaged seal, or not a file of ours).
    """
    head = os.pread(fd, SEAL_BYTES, 0)
    if head.startswith(HDF5_SIGNATURE):
        return None
    return parse_seal(head, size)


def check_frame(fd: int, seal: Seal) -> None:
    """Hash the frame (what HDF5 parses) and compare it with the seal."""
    chunk_list = b"".join(_read(fd, seal.chunks_at, seal.chunks_at + seal.chunks_len))
    ranges = parse_chunk_list(chunk_list, seal)
    h = hashlib.sha256()
    for a, b in frame_spans(ranges, SEAL_BYTES, seal.chunks_at):
        for block in _read(fd, a, b):
            h.update(block)
    h.update(chunk_list)
    if h.hexdigest() != seal.frame:
        raise SealError("content differs from what was written (SHA-256 of its structure: flipped or overwritten bytes)")


def content_sha256(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    for block in _read(fd, start, end):
        h.update(block)
    return h.hexdigest()


def check_content(fd: int, seal: Seal) -> None:
    """Hash every byte after the seal and compare (``verify``: data chunks included)."""
    if content_sha256(fd, SEAL_BYTES, seal.chunks_at + seal.chunks_len) != seal.content:
        raise SealError("content differs from what was written (SHA-256 mismatch: flipped or overwritten bytes)")


def check_sealed_bytes(data: bytes) -> None:
    """Check a whole sealed file held in memory (a manifest), both digests."""
    seal = parse_seal(data[:SEAL_BYTES], len(data))
    view = memoryview(data)
    if hashlib.sha256(view[SEAL_BYTES:]).hexdigest() != seal.content:
        raise SealError("content differs from what was written (SHA-256 mismatch: flipped or overwritten bytes)")
    chunk_list = bytes(view[seal.chunks_at :])
    h = hashlib.sha256()
    for a, b in frame_spans(parse_chunk_list(chunk_list, seal), SEAL_BYTES, seal.chunks_at):
        h.update(view[a:b])
    h.update(chunk_list)
    if h.hexdigest() != seal.frame:
        raise SealError("its seal is damaged (the SHA-256 of its structure does not match)")


# Files this process already checked, by identity (device, inode, size, mtime, ctime: any
# rewrite changes the ctime): parts never change once written, and one command opens the same
# part many times (the writer's index, the reader's columns, a merge).
_checked: dict[tuple, Seal | None] = {}


def stat_identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_file(path: str | os.PathLike, *, size: int | None = None, sha256: str = "", frame: str = "", full: bool = False) -> Seal | None:
    """Check the file at ``path`` before anything parses it; return its seal (None: a file
    written before seals).

    ``size``, ``sha256`` and ``frame`` are what a manifest recorded, when it lists the file:
    ``sha256`` is the sealed content's digest, or for a file written before seals the whole
    file's (then hashed in full: the only check such a file has). ``full`` also hashes every
    data chunk (``verify``); otherwise chunks are left to their Fletcher-32 checks.

    Raises:
        SealError: what is wrong, in words. FileNotFoundError, OSError: as ``open`` raises them.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if size is not None and st.st_size != size:
            raise SealError(f"{st.st_size:,} bytes on disk, {size:,} written (truncated or appended to)")
        key = (*stat_identity(st), sha256, frame, full)
        if key in _checked:
            return _checked[key]
        seal = read_seal(fd, st.st_size)
        if seal is None:
            if sha256 and content_sha256(fd, 0, st.st_size) != sha256:
                raise SealError("content differs from what was written (SHA-256 mismatch: flipped or overwritten bytes)")
        else:
            if (sha256 and seal.content != sha256) or (frame and seal.frame != frame):
                raise SealError("its seal is not the one the manifest recorded (another file under this name)")
            check_frame(fd, seal)
            if full:
                check_content(fd, seal)
        if len(_checked) > 100_000:
            _checked.clear()
        _checked[key] = seal
        return seal
    finally:
        os.close(fd)
