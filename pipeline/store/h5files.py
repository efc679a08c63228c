"""Writing HDF5 files that are complete or absent, checksummed, and never half-written on a full disk.

Every file the store writes (parts, manifests) is built by :func:`new_hdf5`:

* **space first**: the temporary file gets its upper-bound size reserved with
  ``posix_fallocate`` before HDF5 writes a byte, so a full disk is a clean ``OSError``
  (exit 6) up front, never HDF5 failing mid-write (which raised odd RuntimeErrors and
  could crash the interpreter on close);
* **checksums**: every dataset is chunked with HDF5's Fletcher-32 filter (verified on every
  read), and the file is *sealed* (``seal.py``): the SHA-256 of everything HDF5 parses is
  checked before h5py opens it, and the SHA-256 of every byte is returned for the manifest
  (``featcache verify``);
* **atomic**: temporary name, fsync, rename, fsync of the folder.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import discard_temporary, ensure_free_space, fsync_dir, storage_error, temp_name_for
from .seal import SEAL_BYTES, merge_ranges, write_seal

CHUNK_BYTES = 1 << 20  # target chunk size: whole chunks are what HDF5 checksums and reads
UTF8 = "utf-8"


class _ReservedFile(io.RawIOBase):
    """The file object h5py writes through: positional reads and writes on one descriptor,
    tracking the logical end (the reservation beyond it is cut off at the end).

    An I/O error is never handed to HDF5 (its error paths after a failed write crashed the
    interpreter, with a segfault or a bus error, when the file object was collected): it is
    kept, later writes are skipped, and :func:`new_hdf5` raises it once HDF5 has closed the
    file, then discards the file."""

    def __init__(self, fd: int):
        self.fd, self.pos, self.end = fd, 0, 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.end + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = 0
        if self.error is None:
            try:
                n = os.preadv(self.fd, [view], self.pos)
            except OSError as exc:
                self.error = exc
        if n < len(view) and self.pos + n < self.end:  # a region whose write failed: zeros, never an error for HDF5
            view[n:] = bytes(len(view) - n)
            n = len(view)
        self.pos += n
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as exc:
                self.error = exc
        self.pos += len(view)
        self.end = max(self.end, self.pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        self.end = self.pos if size is None else size
        return self.end

    def flush(self) -> None:
        pass


@dataclass
class WrittenFile:
    """What :func:`new_hdf5` wrote, filled in once the file is in place."""

    path: Path
    bytes: int = 0
    sha256: str = ""  # of every byte after the seal
    frame: str = ""  # of what HDF5 parses (see seal.py)


def reserve_space(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` for ``fd`` (ENOSPC here is the clean, early failure we want);
    filesystems without fallocate are written without a reservation."""
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def file_sha256(path: Path | int, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file (a path, or an open descriptor read from offset 0)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY) if not isinstance(path, int) else path
    try:
        offset = 0
        while True:
            block = os.pread(fd, chunk, offset)
            if not block:
                break
            h.update(block)
            offset += len(block)
    finally:
        if not isinstance(path, int):
            os.close(fd)
    return h.hexdigest()


def chunk_ranges(path: Path) -> np.ndarray:
    """``[k, 2]`` (offset, length) of the Fletcher-32-checked data chunks of the HDF5 file at
    ``path`` (the bytes a seal leaves to those checks), touching chunks joined."""
    found: list[tuple[int, int]] = []

    def visit(_name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.chunks is None or not obj.fletcher32:
            return
        dsid = obj.id
        if hasattr(dsid, "chunk_iter"):
            dsid.chunk_iter(lambda info: found.append((info.byte_offset, info.size)))
        else:
            found.extend((info.byte_offset, info.size) for info in map(dsid.get_chunk_info, range(dsid.get_num_chunks())))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return merge_ranges(found)


@contextmanager
def new_hdf5(final: Path, reserve: int, chunks_outside_frame: bool = True) -> Iterator[tuple[h5py.File, WrittenFile]]:
    """Yield ``(h5py file, result)`` to fill; on success the file is sealed and replaces
    ``final`` atomically, and ``result`` holds its size and digests. ``reserve`` is an upper
    bound of the file's size. ``chunks_outside_frame=False`` seals every byte into the frame
    (a small file read whole, such as the manifest).

    Raises:
        StorageError: no room for ``reserve`` bytes (checked, then reserved), or another
            write failure; nothing is left behind.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, final) from exc
    reserve = int(reserve) + (256 << 10)
    ensure_free_space(final, reserve)
    tmp = temp_name_for(final)
    fd = -1
    result = WrittenFile(final)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        reserve_space(fd, reserve)
        raw = _ReservedFile(fd)
        with h5py.File(raw, "w", libver="latest", userblock_size=SEAL_BYTES, rdcc_nbytes=2 * CHUNK_BYTES) as f:  # a partial chunk per dataset fits
            yield f, result
        if raw.error is not None:
            raise raw.error
        os.ftruncate(fd, raw.end)
        seal = write_seal(fd, raw.end, chunk_ranges(tmp) if chunks_outside_frame else np.zeros((0, 2), np.int64))
        result.bytes, result.sha256, result.frame = seal.chunks_at + seal.chunks_len, seal.content, seal.frame
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        failure = discard_temporary(tmp, exc, final)
        if failure is exc:
            raise
        raise failure from exc


def chunk_rows(row_bytes: int, n_rows: int, target: int = CHUNK_BYTES) -> int:
    return int(max(1, min(max(n_rows, 1), target // max(row_bytes, 1))))


def create(group: h5py.Group, name: str, shape: tuple[int, ...], dtype, compress: bool = False) -> h5py.Dataset:
    """A chunked, Fletcher-32-checksummed dataset (growable along rows, so it may be empty)."""
    dtype = np.dtype(dtype)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    chunks = (chunk_rows(row_bytes, shape[0], CHUNK_BYTES if len(shape) > 1 else CHUNK_BYTES // 4), *shape[1:])
    extra = {"compression": "gzip", "compression_opts": 1} if compress else {}
    return group.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype, chunks=chunks, fletcher32=True, **extra)


def put(group: h5py.Group, name: str, data: np.ndarray, compress: bool = False) -> h5py.Dataset:
    """Write ``data`` as a checksummed dataset; byte strings are stored as UTF-8 text."""
    data = np.asarray(data)
    if data.dtype.kind == "S":
        data = data.astype(h5py.string_dtype(UTF8, max(data.dtype.itemsize, 1)))
    ds = create(group, name, data.shape, data.dtype, compress)
    if data.size:
        ds[...] = data
    return ds


def utf8_dtype(width: int) -> np.dtype:
    return h5py.string_dtype(UTF8, max(int(width), 1))


def hdf5_overhead(n_datasets: int, n_chunks: int) -> int:
    """Upper bound of HDF5's own bytes beside the data (headers, chunk indexes, checksums)."""
    return 64 * 1024 + 4096 * n_datasets + 128 * n_chunks
