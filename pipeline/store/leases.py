"""Reader leases: a reader pins the cache version it opened, and no writer deletes a part
that version needs until the reader is done (Delta Lake keeps old files for readers with a
retention period; a lease is exact and costs nothing when nobody reads).

A lease is a file ``X.h5.parts/.readers/lease-PID-…`` holding a shared ``flock`` for as
long as the reader lives (the kernel drops it when the process dies, even by kill -9) and
the generation it pinned. It is created under a temporary name, locked, then renamed, so a
writer never sees an unlocked lease of a live reader. A writer deletes a retired part only
when every live lease pinned a generation at least as new as the one that retired it; a
lease whose pin is not written yet protects everything.

A reader that cannot create a lease (a read-only folder) reads without one; if a writer then
removes a part it needs, the read fails loudly (``SnapshotGoneError``), never returning
another version's rows.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

READERS_DIR = ".readers"


class ReaderLease:
    """A live reader's claim on one cache version (release it, or let the process end)."""

    def __init__(self, parts_dir: Path):
        self.path: Path | None = None
        self._fd = -1
        folder = Path(parts_dir) / READERS_DIR
        if not Path(parts_dir).is_dir():  # a cache without parts yet: nothing to protect
            return
        try:
            folder.mkdir(exist_ok=True)
            tmp = folder / f".new-{os.getpid()}-{uuid.uuid4().hex[:10]}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                final = folder / f"lease-{os.getpid()}-{uuid.uuid4().hex[:10]}"
                os.rename(tmp, final)
            except OSError:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            self.path, self._fd = final, fd
        except OSError:  # read-only folder, full disk: read without a lease
            self.path, self._fd = None, -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def pin(self, generation: int) -> None:
        if self._fd >= 0:
            try:
                os.pwrite(self._fd, str(int(generation)).encode(), 0)
            except OSError:
                pass  # an unwritten pin protects every version: safe, just keeps files longer

    def release(self) -> None:
        if self._fd >= 0:
            try:
                if self.path is not None:
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass
            try:
                os.close(self._fd)  # closing drops the flock
            except OSError:
                pass
            self._fd = -1

    def __del__(self) -> None:
        self.release()


def live_pins(parts_dir: Path) -> list[int | None]:
    """Generations pinned by live readers (None: a reader between locking and pinning).
    Leases of dead readers are removed on the way."""
    folder = Path(parts_dir) / READERS_DIR
    pins: list[int | None] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return pins
    for entry in entries:
        if not entry.name.startswith("lease-"):
            if entry.name.startswith(".new-") and not _pid_alive(entry.name.split("-")[1]):
                _unlink(entry.path)  # a reader died between creating and publishing its lease
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live reader holds it
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                pins.append(int(text) if text.isdigit() else None)
                continue
            _unlink(entry.path)  # nobody holds it: its reader is gone
        finally:
            os.close(fd)
    return pins


def needed_by_readers(since: int, pins: list[int | None]) -> bool:
    """Whether a file retired at generation ``since`` may still be read by a live reader."""
    return any(p is None or p < since for p in pins)


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except OSError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
