"""WebDataset tar shards in, records out: ``shards/train-{000000..000127}.tar``.

Members are grouped by key as WebDataset groups them (``KEY.jpg`` / ``.png`` / ``.webp`` …
plus an optional ``KEY.cls`` (class index), ``KEY.txt`` (class name) or ``KEY.json``
(``label``, ``class`` or ``cls``)). Images are never unpacked: a record points at its shard
and the member's offset, and the decoder processes read members in place, in parallel.

A row's identity is ``<shard>/<key>.<ext>``; its fingerprint is the member's size and the
shard's mtime, so a rewritten shard is extracted again. A shard's member list is remembered
in a small index keyed by the shard's path, size and mtime, so a re-run over unchanged
shards does not open them. A member that is not an image is ignored; a label file that
cannot be read, a truncated shard (members past its end) and a file that is not a tar are
skipped with reasons, and the rest is processed.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from ..errors import DataError
from .folders import IMG_EXTENSIONS, UNLABELED, ImageRecord, ScanResult

SHARD_SUFFIX = ".tar"
LABEL_EXTENSIONS = ("cls", "txt", "json")
INDEX_VERSION = 1
_BRACE = re.compile(r"\{([^{}]*)\}")


def is_shards(source: str | os.PathLike) -> bool:
    """A shard pattern or a single shard (``.tar``, with braces or globs allowed)."""
    return str(source).endswith(SHARD_SUFFIX) and not Path(source).is_dir()


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept);
    ``{x,y}`` lists as in the shell and WebDataset's braceexpand."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    if ".." in body and "," not in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"shard pattern {pattern!r}: a range is written {{000..127}} (digits)")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def expand_shards(pattern: str | os.PathLike) -> list[Path]:
    """Every existing shard a pattern names (braces, then globs), sorted, each once."""
    found: dict[str, None] = {}
    missing = []
    for item in expand_braces(os.path.expanduser(str(pattern))):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.isfile(item) else [])
        if not matches:
            missing.append(item)
        found.update(dict.fromkeys(os.path.abspath(m) for m in matches))
    if not found:
        raise DataError(f"shard pattern {str(pattern)!r} matches no file" + (f" (e.g. {missing[0]!r} does not exist)" if missing else ""))
    return [Path(p) for p in found]


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's folder plus its base name up to the first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _label_value(ext: str, data: bytes) -> str | int:
    text = data.decode("utf-8").strip()
    if ext == "cls":
        return int(text)
    if ext == "txt":
        return text
    obj = json.loads(text)
    if isinstance(obj, dict):
        for key in ("label", "class", "cls"):
            if key in obj:
                return obj[key]
        raise ValueError("no 'label', 'class' or 'cls' key")
    return obj if isinstance(obj, (int, str)) else str(obj)


def _read_shard(path: Path) -> dict[str, Any]:
    """Open one shard and list its images (offset, size) and labels, as an index entry."""
    st = path.stat()
    entry: dict[str, Any] = {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "members": [], "skipped": []}
    groups: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                group = groups.setdefault(key, {})
                if member.offset_data + member.size > st.st_size:
                    entry["skipped"].append([member.name, "truncated shard: the member runs past the end of the file"])
                    group["broken"] = True
                elif "." + ext in IMG_EXTENSIONS and "image" not in group:
                    group["image"] = [member.name, member.offset_data, member.size]
                elif ext in LABEL_EXTENSIONS and "label" not in group:
                    try:
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        group["label"] = _label_value(ext, data)
                    except (ValueError, UnicodeDecodeError, tarfile.TarError) as exc:
                        entry["skipped"].append([member.name, f"unreadable label: {type(exc).__name__}: {exc}"])
                        group["broken"] = True
    except tarfile.ReadError as exc:
        if not groups:
            entry["skipped"].append(["", f"not a tar file ({exc})"])
            return entry
        entry["skipped"].append(["", f"truncated or damaged after {len(groups)} keys ({exc}); the rest of the shard is skipped"])
    except OSError as exc:
        entry["skipped"].append(["", f"cannot read ({exc.strerror or exc})"])
        return entry
    for key, group in groups.items():
        if "image" in group and not group.get("broken"):
            name, offset, size = group["image"]
            entry["members"].append([name, offset, size, group.get("label")])
        elif "image" in group:
            entry["skipped"].append([group["image"][0], "skipped: its label or data is damaged"])
    return entry


def _index_path(index_dir: Path, shard: Path) -> Path:
    return index_dir / f"{hashlib.sha256(str(shard).encode()).hexdigest()[:24]}.json"


def shard_members(shard: Path, index_dir: Path | None) -> dict[str, Any]:
    """The shard's index entry: from ``index_dir`` when its size and mtime are unchanged
    (the shard is not opened), else read from the shard and remembered there."""
    st = shard.stat()
    cached = _index_path(index_dir, shard) if index_dir is not None else None
    if cached is not None:
        try:
            entry = json.loads(cached.read_text())
            if (entry.get("version"), entry.get("size"), entry.get("mtime_ns")) == (INDEX_VERSION, st.st_size, st.st_mtime_ns):
                return entry
        except (OSError, ValueError):
            pass
    entry = _read_shard(shard)
    if cached is not None and entry["members"]:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache folder: the shard is simply read again next time
    return entry


def _class_names(values: set) -> list[str]:
    if values and all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def scan_shards(pattern: str | os.PathLike, index_dir: Path | None = None) -> ScanResult:
    """The images in every shard a pattern names, with labels and fingerprints.

    Raises:
        DataError: the pattern matches no file, or no shard holds a usable image.
    """
    shards = expand_shards(pattern)
    root = Path(os.path.commonpath([str(s.parent) for s in shards]))
    entries = [(s, shard_members(s, index_dir)) for s in shards]
    labelled = any(m[3] is not None for _, e in entries for m in e["members"])
    classes = _class_names({m[3] for _, e in entries for m in e["members"] if m[3] is not None}) if labelled else []
    label_of = {c: i for i, c in enumerate(classes)}
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    for shard, entry in entries:
        rel = shard.relative_to(root).as_posix()
        skipped += [(f"{rel}/{name}" if name else rel, reason) for name, reason in entry["skipped"]]
        for name, offset, size, label in entry["members"]:
            if labelled and label is None:
                skipped.append((f"{rel}/{name}", "no label file (.cls, .txt or .json) beside it"))
                continue
            records.append(ImageRecord(f"{rel}/{name}", label_of[str(label)] if labelled else UNLABELED, "", size, entry["mtime_ns"], rel, offset))
    if not records:
        raise DataError(f"shards {str(pattern)!r} hold no usable image ({len(shards)} shard(s)"
                        + (f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else "") + ")")
    return ScanResult(root, "shards", classes, records, skipped, source=Path(os.path.abspath(os.path.expanduser(str(pattern)))))
