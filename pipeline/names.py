"""Names that come from users' data (row paths, class names): what a row path may be, and
how any name is shown on one line.

A row path is the key of a cache row: the file's path relative to the data root,
``/``-separated. Folder scans, manifests and imports all check it here, so a cache never
holds a path one of them would refuse. A folder scan can produce any name the file system
holds, so control characters (a newline in a file name) are legal: they are stored as they
are, round-trip through export and import, and are only ever *displayed* escaped.
"""
from __future__ import annotations

import posixpath
import re

MAX_PATH_BYTES = 4096  # Linux's PATH_MAX
MAX_NAME_BYTES = 255  # NAME_MAX of ext4, XFS, btrfs, APFS, NTFS (in UTF-16 units there)
LISTED_AGAIN = "listed again (first listing kept)"  # the one rule for a repeated path: manifests and imports
SHOWN_CHARS = 200  # a refused path is quoted this far in messages
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # clip-retrieval's url column: not a path


def printable(text: object) -> str:
    """``text`` as one terminal line: control and other unprintable characters (a newline in
    a file or class name, an undecodable byte) escaped as Python escapes them, so one record
    stays on one line and nothing is hidden."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``printable(text)`` shortened for a message (a 5 MB path is not quoted whole)."""
    text = printable(text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def row_path_problem(path: str, *, absolute_ok: bool = False) -> str | None:
    """Why ``path`` cannot be a row's stored path (None when it can): no NUL byte, not empty,
    at most 4096 bytes and 255 per component, no empty, ``.`` or ``..`` component (one file,
    one spelling; nothing escapes the data root), not a URL, and not absolute unless
    ``absolute_ok`` (a manifest's rows outside its folder are keyed by their absolute path).
    Cheap for ordinary paths: bytes are counted only for long ones."""
    if not path:
        return "is empty"
    if "\0" in path:
        return "holds a NUL byte (no file name can)"
    if len(path) > MAX_PATH_BYTES // 4 and _nbytes(path) > MAX_PATH_BYTES:
        return f"is {_nbytes(path):,} bytes long; a path may have at most {MAX_PATH_BYTES:,}"
    absolute = path.startswith("/")
    if absolute and not absolute_ok:
        return "is absolute; rows are keyed by the file's path relative to the data root (give relative paths and --data-root)"
    if URL.match(path):
        return "is a URL; rows are keyed by the file's path relative to the data root"
    for part in (path[1:] if absolute else path).split("/"):
        if part in ("", ".", ".."):
            canon = posixpath.normpath(path)
            what = {"": "an empty component ('//' or a '/' at the end)", ".": "a '.' component", "..": "a '..' component"}[part]
            fix = "a row path stays inside the data root" if canon == ".." or canon.startswith("../") else f"write it as {canon!r} (each file one way)"
            return f"has {what}; {fix}"
        if len(part) > MAX_NAME_BYTES // 4 and _nbytes(part) > MAX_NAME_BYTES:
            return f"has a component of {_nbytes(part):,} bytes ({shown(part, 40)}); a file name may have at most {MAX_NAME_BYTES}"
    return None
