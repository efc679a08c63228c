"""featcache's log: plain lines on stderr for people, and a file (text or JSON lines) for machines.

Everything a command reports goes through the ``featcache`` logger, so ``--log-file``
captures exactly what a person would have seen (plus timestamps), ``--quiet``/``--json``
only silence the terminal, and errors always reach stderr.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("featcache")


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


def configure(log_file: Path | None = None, json_lines: bool = False) -> None:
    """(Re)build the handlers: stderr always; ``log_file`` appended to when given.

    ``json_lines`` formats the file as JSON lines (or stderr, when there is no file).
    """
    global _console
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()
    _console = _CurrentStderrHandler()
    _console.setLevel(logging.INFO)
    _console.addFilter(_not_a_result)  # results went to stdout already
    _console.setFormatter(JsonLinesFormatter() if json_lines and log_file is None else logging.Formatter("%(message)s"))
    LOGGER.addHandler(_console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOGGER.addHandler(fh)


def quiet_console(quiet: bool) -> None:
    """Only warnings and errors on stderr (``--quiet``/``--json``); the log file keeps everything."""
    if _console is None:
        configure()
    _console.setLevel(logging.WARNING if quiet else logging.INFO)


def _not_a_result(record: logging.LogRecord) -> bool:
    return not getattr(record, "result", False)


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
