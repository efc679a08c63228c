"""Write-then-rename: a file either has its old complete content or its new one.

Every artifact featcache writes (cache parts, cache index, heads, checkpoints) goes
through :func:`atomic_path`: write to a hidden temporary name in the same folder, flush,
fsync, ``os.replace`` onto the final name, fsync the folder. A process killed at any
moment leaves at worst a stray temporary file, which writers clean up.
"""
from __future__ import annotations

import errno
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "errno = 28" in text:
        what = "the disk is full"
        fix = "free some space and run again"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text or "Permission denied" in text:
        what = "the folder is read-only or not writable"
        fix = "choose a writable --out or fix the permissions"
    else:
        what = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
        fix = "check the disk and run again"
    return StorageError(f"cannot write {str(target)!r}: {what}; nothing was changed, {fix}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, final) from exc
    tmp = temp_name_for(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise storage_error(exc, final) from exc
        raise


def remove_stale_temporaries(folder: Path, prefix: str = "") -> int:
    """Delete leftovers of writers that died mid-write (only call while holding the writer lock)."""
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith("." + prefix) and TMP_MARK in entry.name:
            try:
                entry.unlink()
                removed += 1
            except OSError:
                pass
    return removed
