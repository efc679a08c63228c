"""featcache's log: plain lines on stderr for people, and a file (text or JSON lines) for machines.

The library logs through standard ``logging`` (``logging.getLogger(__name__)`` in each
module, so every record lands under the ``pipeline`` logger); a library caller configures
logging as for any other package. The command line installs its handlers here, once per
process: ``--log-file`` captures exactly what a person would have seen (plus timestamps),
``--quiet``/``--json`` only silence the terminal, errors always reach stderr, and under
torchrun only rank 0 says what it does (the other ranks' warnings and errors still show).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("pipeline")  # the library's modules log to its children


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, message and any ``fields`` given."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        return json.dumps(entry, default=str, ensure_ascii=False)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was made:
    a caller that swaps stderr (pytest, click's CliRunner, a notebook) and later closes its stream
    must not leave the logger writing to a closed file."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_console: logging.Handler | None = None
_ours: list[logging.Handler] = []  # the handlers configure() installed (a caller's own stay)
_before: tuple[int, bool] | None = None  # the logger's level and propagation before configure(), which reset() puts back


def configure(log_file: Path | None = None, json_lines: bool = False) -> None:
    """(Re)build the command line's handlers: stderr always; ``log_file`` appended to when given.

    ``json_lines`` formats the file as JSON lines (or stderr, when there is no file).
    """
    global _console, _before
    reset()
    _before = (LOGGER.level, LOGGER.propagate)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the command line owns the terminal: nothing printed twice through the root logger
    _console = _CurrentStderrHandler()
    _console.setLevel(logging.INFO)
    _console.addFilter(_not_a_result)  # results went to stdout already
    _console.addFilter(_main_rank_or_trouble)
    _console.setFormatter(JsonLinesFormatter() if json_lines and log_file is None else logging.Formatter("%(message)s"))
    _ours.append(_console)
    LOGGER.addHandler(_console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.addFilter(_main_rank_or_trouble)
        fh.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        _ours.append(fh)
        LOGGER.addHandler(fh)


def quiet_console(quiet: bool) -> None:
    """Only warnings and errors on stderr (``--quiet``/``--json``); the log file keeps everything."""
    if _console is None:
        configure()
    _console.setLevel(logging.WARNING if quiet else logging.INFO)


def _not_a_result(record: logging.LogRecord) -> bool:
    return not getattr(record, "result", False)


def _main_rank_or_trouble(record: logging.LogRecord) -> bool:
    """Under torchrun every rank runs the same code: rank 0 says what happens, the others only
    their warnings and errors (prefixed with the rank, as several may report one problem)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        return True
    if record.levelno < logging.WARNING:
        return False
    if not getattr(record, "rank_prefixed", False):
        record.msg, record.rank_prefixed = f"[rank {rank}] {record.msg}", True
    return True


def reset() -> None:
    """Undo ``configure``: its handlers removed, the logger's level and propagation as they were
    (a test that ran the command line in this process leaves logging as it found it; a
    caller's own handlers and level stay)."""
    global _console, _before
    while _ours:
        handler = _ours.pop()
        LOGGER.removeHandler(handler)
        handler.close()
    if _before is not None:
        LOGGER.setLevel(_before[0])  # setLevel, not the attribute: it clears the loggers' cached isEnabledFor answers
        LOGGER.propagate = _before[1]
        _before = None
    _console = None


def result(message: str, show: bool = True) -> None:
    """A command's result (the summary a person or a pipe wants): on stdout, Unix-style, unless
    ``show`` is False (--quiet/--json); always into the log file, like every other message."""
    if show:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
    LOGGER.info(message, extra={"fields": {}, "result": True})


def info(message: str, **fields: Any) -> None:
    LOGGER.info(message, extra={"fields": fields})


def warning(message: str, **fields: Any) -> None:
    LOGGER.warning(message, extra={"fields": fields})


def error(message: str, **fields: Any) -> None:
    LOGGER.error(message, extra={"fields": fields})
