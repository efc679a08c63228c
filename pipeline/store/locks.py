"""Advisory file locks for writers (one writer per cache or artifact at a time).

``fcntl.flock`` locks die with their process, so a lock left by a killed writer is never
stale: the next writer simply gets it (no PID probing or age heuristics, which misfire
across hosts and after PID reuse). The lock file records who holds it, for messages; a
record found by the next writer means its author died holding the lock, which is logged.
A clean release deletes the file (no empty ``.lock`` files left beside artifacts); so a
writer that got the lock checks that the file it locked is still the one at the path, and
starts again if it was deleted under it (the usual flock-and-unlink protocol).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import LockHeldError, StorageError
from .atomic import remove_stale_temporaries, storage_error

logger = logging.getLogger(__name__)


def lock_path_for(target: Path) -> Path:
    """``.NAME.lock`` beside ``target``: hidden, so a folder of artifacts lists only artifacts.
    (Not the artifact itself: it is replaced by rename, and a lock on a replaced inode locks nothing.)"""
    return target.with_name(f".{target.name}.lock")


def _describe(text: str) -> str:
    try:
        info = json.loads(text or "{}")
    except ValueError:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} (since {since}, running {info.get('command', '?')})"


def _describe_holder(path: Path) -> str:
    try:
        return _describe(path.read_text())
    except OSError:
        return "another process"


class WriterLock:
    """Exclusive lock on ``target`` (held through the hidden ``.NAME.lock`` beside it).

    ``wait`` seconds: 0 fails at once with :class:`LockHeldError`; otherwise polls until then.
    """

    def __init__(self, target: Path, command: str = "featcache", wait: float = 0.0):
        self.target = Path(target)
        self.path = lock_path_for(self.target)
        self.command = command
        self.wait = wait
        self._fh = None

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+")
        except OSError as exc:
            raise StorageError(f"cannot create lock file {str(self.path)!r}: {exc.strerror}; check that the folder is writable") from exc

    def acquire(self) -> WriterLock:
        fh = self._open()
        deadline = time.monotonic() + max(self.wait, 0.0)
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _describe_holder(self.path)
                    fh.close()
                    raise LockHeldError(
                        f"{str(self.target)!r} is being written by {holder}; wait for it to finish "
                        "or pass --wait SECONDS"
                    ) from None
                time.sleep(0.2)
                continue
            if self._still_at_path(fh):
                break
            fh.close()  # its holder released and deleted it while we waited: lock the file now there
            fh = self._open()
        fh.seek(0)
        left = fh.read().strip()
        if left:  # a clean release empties the file: whoever wrote this died holding the lock
            logger.warning(f"recovered the lock on {str(self.target)!r}: {_describe(left)} stopped without releasing it "
                           "(its committed work is kept)")
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": self.command}))
            fh.flush()
        except OSError as exc:  # a full disk: the lock is held all the same (flock), only the note for messages is missing
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                fh.close()
                raise storage_error(exc, self.path) from exc
        self._fh = fh
        # leftovers of writers of this artifact (and its reports) that died mid-write
        remove_stale_temporaries(self.target.parent, self.target.name.rsplit(".", 1)[0])
        return self

    def _still_at_path(self, fh) -> bool:
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fh.fileno())
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fh is not None:
            try:  # deleted while still held, so no one can lock this file and believe they hold the lock
                self.path.unlink()
            except OSError:  # cannot delete (a read-only folder now): an empty note says "released" as before
                try:
                    self._fh.seek(0)
                    self._fh.truncate()
                except OSError:
                    pass
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            try:
                self._fh.close()
            except OSError:  # the holder note could not be flushed (a full disk): the flock is released all the same
                pass
            self._fh = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
