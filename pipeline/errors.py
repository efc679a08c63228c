"""One exception hierarchy; the CLI maps each class to a documented exit code.

Every message is one line that names the bad thing and says what to do about it.
"""
from __future__ import annotations

import sys
from pathlib import Path


def command_hint(args: str) -> str:
    """``args`` as a command the user can paste: ``python cli.py ARGS`` when they ran the
    script, ``featcache ARGS`` when they ran the installed command (or the library)."""
    script = sys.argv[0] if sys.argv else ""
    return f"python {script} {args}" if Path(script).name == "cli.py" else f"featcache {args}"


class ExitCode:
    """Process exit codes (documented in the README and in ``--help``)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it with --debug output
    USAGE = 2  # bad option, path, model name or config
    PARTIAL = 3  # finished, but some inputs failed (listed in the summary)
    LOCKED = 4  # another process is writing the same cache/artifact
    INCOMPATIBLE = 5  # cache/head/checkpoint corrupt, foreign, or built for something else
    UNAVAILABLE = 6  # a resource is missing: pretrained weights offline, disk full, read-only
    DIVERGED = 7  # training loss blew up (NaN/inf or orders of magnitude): lower the learning rate
    FINDINGS = 8  # `audit --fail-on CHECKS`: finished, and one of those checks found something (for cron alerts)
    INTERRUPTED = 130  # SIGINT/SIGTERM: finished work was committed, then we stopped


class FeatcacheError(Exception):
    """Base of every error featcache raises on purpose (never for bugs)."""

    exit_code = ExitCode.USAGE


class UsageError(FeatcacheError):
    """A bad option value, path or combination of options."""


class DataError(FeatcacheError):
    """The image folder cannot be used as given (missing, empty, wrong layout)."""


class BackboneError(FeatcacheError):
    """Unknown model name or weights specification."""


class WeightsUnavailableError(FeatcacheError):
    """Pretrained weights were asked for but cannot be had (offline, not cached)."""

    exit_code = ExitCode.UNAVAILABLE


class CacheError(FeatcacheError):
    """A cache file is corrupt, foreign, of a newer schema, or incompatible."""

    exit_code = ExitCode.INCOMPATIBLE


class DamagedCacheError(CacheError):
    """A cache file's bytes are not what was written (checksum mismatch, bad header, truncation).

    ``parts``: the damaged part files (empty when the manifest itself is damaged)."""

    def __init__(self, message: str, parts: tuple[str, ...] = ()):
        super().__init__(message)
        self.parts = tuple(parts)


class SnapshotGoneError(CacheError):
    """A reader's pinned cache version lost a part (compacted away by a writer that could not
    see the reader): the read stops rather than return another version's rows."""


class IncompatibleError(FeatcacheError):
    """Two artifacts do not belong together (e.g. a resnet50 head on a resnet18 cache)."""

    exit_code = ExitCode.INCOMPATIBLE


class UntrustedCodeError(IncompatibleError):
    """A head, model or checkpoint names a backbone whose loading would run code from outside
    the installed packages (a torch.hub repo's hubconf.py); refused until the user consents."""


class LockHeldError(FeatcacheError):
    """Another live process holds the lock on what we want to write."""

    exit_code = ExitCode.LOCKED


class StorageError(FeatcacheError):
    """Writing failed (disk full, read-only directory); the previous state is intact."""

    exit_code = ExitCode.UNAVAILABLE


class Interrupted(FeatcacheError):
    """SIGINT/SIGTERM arrived; finished work was committed before stopping."""

    exit_code = ExitCode.INTERRUPTED


class TrainingDivergedError(FeatcacheError):
    """Training loss blew up (NaN/inf, or orders of magnitude above its start); lower the learning rate.

    The hyperparameters, not the program, need changing; what was saved before is intact.
    """

    exit_code = ExitCode.DIVERGED


TrainingDiverged = TrainingDivergedError  # the earlier name

