"""WebDataset tar shards in, records out: ``shards/train-{000000..000127}.tar``.

Members are grouped by key as WebDataset groups them (``KEY.jpg`` / ``.png`` / ``.webp`` …
plus an optional ``KEY.cls`` (class index), ``KEY.txt`` (class name) or ``KEY.json``
(``label``, ``class`` or ``cls``)). Images are never unpacked: a record points at its shard
and the member's offset, and the decoder processes read members in place, in parallel.

A row's identity is ``<shard>/<key>.<ext>``; its fingerprint is the member's size and the
shard's mtime, so a rewritten shard is extracted again. A shard's member list is remembered
in a small index keyed by the shard's path, size and mtime, so a re-run over unchanged
shards does not open them. A member that is not an image is ignored. What cannot be used is a
failure recorded in the cache (exit 3, listed by ``status``), never silently dropped, and the
rest is processed: a truncated or damaged shard (named once, as the shard; tarfile itself
stops quietly at a cut header, so the end-of-archive marker is checked), a file that is not a
tar, a symbolic or hard link member (links are not followed), an image whose label member is
unreadable or missing. Its fingerprint is the shard's mtime, so a repaired shard is retried.
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
from .folders import IMG_EXTENSIONS, UNLABELED, ImageRecord, ScanFailure, ScanResult

SHARD_SUFFIX = ".tar"
LABEL_EXTENSIONS = ("cls", "txt", "json")
INDEX_VERSION = 2  # 2: unusable members and truncation are listed as 'failed' (with sizes)
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


def _spoil(group: dict[str, Any], name: str, reason: str, size: int) -> None:
    """Mark a key's group unusable because of one of its members (the first problem is kept)."""
    group.setdefault("problem", [name, reason, size])


def _link_reason(member: tarfile.TarInfo) -> str:
    kind = "symbolic" if member.issym() else "hard"
    return f"{kind} link to {member.linkname!r}: links in shards are not followed; store the file itself in the shard"


def _end_problem(path: Path, offset: int, size: int, last: str) -> str | None:
    """Why the shard does not end where its last member says it should (tarfile stops quietly
    at a cut or damaged header), or None when the end-of-archive marker is there."""
    after = f"after member {last!r}" if last else "before its first member"
    with open(path, "rb") as fh:
        fh.seek(offset)
        block = fh.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    if len(block) < tarfile.BLOCKSIZE:
        return (f"truncated shard: it ends {after} (byte {size}) without the tar end-of-archive marker, so the members after it are "
                "missing; copy the shard again")
    return f"damaged shard: the header at byte {offset} ({after}) is not a tar header; the rest of the shard is not read; copy the shard again"


CUT = "cut off where the shard is truncated"


def _scan_members(tar: tarfile.TarFile, size: int, groups: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """Group the members by key (images, labels, links as problems); returns the last member
    read whole and, when the shard stops early (a member runs past the end of the file, or a
    header tarfile refuses), why."""
    last = ""
    members = iter(tar)
    while True:
        try:
            member = next(members, None)
        except tarfile.ReadError as exc:
            return last, f"damaged shard after member {last!r} ({exc}); the rest of the shard is not read; copy the shard again"
        if member is None:
            return last, None
        key, ext = _split_name(member.name)
        used = "." + ext in IMG_EXTENSIONS or ext in LABEL_EXTENSIONS
        if member.offset_data + member.size > size:
            if used:
                _spoil(groups.setdefault(key, {}), member.name, CUT, member.size)
            have = max(0, size - member.offset_data)
            return last, (f"truncated shard: it ends inside member {member.name!r} ({have} of its {member.size} bytes); the members from "
                          "there on are missing; copy the shard again")
        if member.issym() or member.islnk():
            if used:
                _spoil(groups.setdefault(key, {}), member.name, _link_reason(member), 0)
        elif member.isfile():
            group = groups.setdefault(key, {})
            if "." + ext in IMG_EXTENSIONS and "image" not in group:
                group["image"] = [member.name, member.offset_data, member.size]
            elif ext in LABEL_EXTENSIONS and "label" not in group:
                try:
                    group["label"] = _label_value(ext, tar.extractfile(member).read())  # type: ignore[union-attr]
                except (ValueError, UnicodeDecodeError, tarfile.TarError) as exc:
                    _spoil(group, member.name, f"unreadable label: {type(exc).__name__}: {exc}", member.size)
        last = member.name


def _read_shard(path: Path) -> dict[str, Any]:
    """Open one shard and list its images (offset, size, label) and, as failures, what cannot
    be used: a truncated or damaged shard (``""``: the shard itself), link members, members
    whose label is unreadable; an index entry."""
    st = path.stat()
    entry: dict[str, Any] = {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "members": [], "failed": []}
    groups: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            last, problem = _scan_members(tar, st.st_size, groups)
            problem = problem or _end_problem(path, tar.offset, st.st_size, last)
    except tarfile.ReadError as exc:  # refused before its first member
        entry["failed"].append(["", f"not a tar file ({exc}); shards are plain uncompressed .tar files: create or copy it again", st.st_size])
        return entry
    except OSError as exc:
        entry["failed"].append(["", f"cannot read the shard ({exc.strerror or exc}); check that it is readable", st.st_size])
        return entry
    if problem:
        entry["failed"].append(["", problem, st.st_size])
    for group in groups.values():
        bad = group.get("problem")
        if "image" in group and bad is None:
            name, offset, size = group["image"]
            entry["members"].append([name, offset, size, group.get("label")])
        elif "image" in group:
            entry["failed"].append([group["image"][0], f"not extracted: {bad[0]}: {bad[1]}", group["image"][2]])
        elif bad is not None and bad[1] != CUT:  # (the shard's own record says so)
            entry["failed"].append(bad)
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
    failed: list[ScanFailure] = []
    for shard, entry in entries:
        rel = shard.relative_to(root).as_posix()
        failed += [ScanFailure(f"{rel}/{name}" if name else rel, reason, size, entry["mtime_ns"]) for name, reason, size in entry["failed"]]
        for name, offset, size, label in entry["members"]:
            if labelled and label is None:
                failed.append(ScanFailure(f"{rel}/{name}", "no label file (.cls, .txt or .json) beside it; add one to the shard", size, entry["mtime_ns"]))
                continue
            records.append(ImageRecord(f"{rel}/{name}", label_of[str(label)] if labelled else UNLABELED, "", size, entry["mtime_ns"], rel, offset))
    if not records:
        raise DataError(f"shards {str(pattern)!r} hold no usable image ({len(shards)} shard(s)"
                        + (f"; e.g. {failed[0].relpath}: {failed[0].reason}" if failed else "") + ")")
    return ScanResult(root, "shards", classes, records, [], source=Path(os.path.abspath(os.path.expanduser(str(pattern)))), failed=failed)
