"""Write-then-rename: a file either has its old complete content or its new one.

Every artifact featcache writes (cache parts, cache index, heads, checkpoints) goes
through :func:`atomic_path`: write to a hidden temporary name in the same folder, flush,
fsync, ``os.replace`` onto the final name, fsync the folder. A process killed at any
moment leaves at worst a stray temporary file, which writers clean up.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import StorageError

TMP_MARK = ".tmp-"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems do not support fsync on folders
        pass


def temp_name_for(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def storage_error(exc: BaseException, target: Path) -> StorageError:
    """Translate an OS-level write failure into a one-line, actionable error."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "errno = 28" in text or free_bytes(target.parent) < HEADROOM:
        what = "the disk is full"
        fix = "free some space and run again"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text or "Permission denied" in text:
        what = "the folder is read-only or not writable"
        fix = "choose a writable --out or fix the permissions"
    else:
        what = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
        fix = "check the disk and run again"
    return StorageError(f"cannot write {str(target)!r}: {what}; nothing was changed, {fix}")


# Free space every write leaves untouched: below it, HDF5 and torch.save fail half-way with
# errors that are not OSErrors (and HDF5 can crash the interpreter on closing such a file).
HEADROOM = 1 << 20


def free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62  # cannot tell: let the write itself report


def ensure_free_space(final: Path, need: int) -> None:
    """Refuse up front (StorageError, exit 6) when ``final``'s disk lacks ``need`` bytes plus headroom."""
    free = free_bytes(final.parent)
    if free < need + HEADROOM:
        raise StorageError(f"cannot write {str(final)!r}: the disk is full ({_size(free)} free, about {_size(need + HEADROOM)} needed); "
                           "nothing was changed, free some space and run again")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def payload_bytes(obj: Any) -> int:
    """About how many bytes ``obj`` (tensors and arrays in nested dicts/lists) takes on disk."""
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):  # torch.Tensor
        return int(obj.element_size() * obj.nelement())
    if isinstance(obj, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if isinstance(obj, (str, bytes)):
        return len(obj) + 8
    return 16


def _disk_full_failure(exc: BaseException, folder: Path) -> bool:
    """A write that failed with a library's own error (HDF5's RuntimeError, torch's
    'enforce fail') because the disk filled up under it."""
    return isinstance(exc, RuntimeError) and ("errno = 28" in str(exc) or free_bytes(folder) < HEADROOM)


@contextmanager
def atomic_path(final: Path, need: int = 0) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically.

    ``need``: about how many bytes will be written; a disk without them (plus headroom) is
    refused before anything is written."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, final) from exc
    ensure_free_space(final, need)
    tmp = temp_name_for(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        failure = discard_temporary(tmp, exc, final)
        if failure is exc:
            raise
        raise failure from exc


def discard_temporary(tmp: Path, exc: BaseException, final: Path) -> BaseException:
    """Remove a failed write's temporary; what to raise: a one-line StorageError for a failure
    of the disk (full, read-only), else ``exc`` itself."""
    try:
        tmp.unlink()
    except OSError:
        pass
    if isinstance(exc, OSError) or _disk_full_failure(exc, final.parent):
        return storage_error(exc, final)
    return exc


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary (``…tmp-PID-xxxx``) still runs here."""
    try:
        pid = int(name.split(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def write_bytes_atomically(final: Path, data: bytes | memoryview) -> Path:
    """``data`` to ``final`` (atomic). Serialise in memory first, then call this: a full disk
    is then a clean OSError before the rename, not a library failing half-way through its
    own writes (torch.save's "enforce fail", HDF5's crash on close)."""
    with atomic_path(final, len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(final)


def remove_stale_temporaries(folder: Path, prefix: str = "") -> int:
    """Delete leftovers of writers that died mid-write: temporaries named ``.PREFIX…tmp-PID-…``
    whose PID no longer runs (a live writer's, even of another artifact sharing the prefix,
    are left alone). Call while holding the writer lock."""
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith("." + prefix) and TMP_MARK in entry.name and not _writer_alive(entry.name):
            try:
                entry.unlink()
                removed += 1
            except OSError:
                pass
    return removed
