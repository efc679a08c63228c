"""Image folders in, records out.

Scanning follows ``torchvision.datasets.ImageFolder`` exactly (class folders sorted as
``os.scandir`` names, files found by a sorted ``os.walk(followlinks=True)``, the same
extensions, case-insensitive) so class indices agree with the classic tutorials. It adds
what ImageFolder lacks: pre-split ``train/ val/ test/`` roots, flat unlabeled folders,
symlink-loop protection, and file fingerprints for incremental extraction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..choices import LAYOUTS
from ..errors import DataError
from ..names import row_path_problem, shown

# Same list as torchvision.datasets.folder.IMG_EXTENSIONS (checked by a test).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
Layout = Literal["auto", "imagefolder", "split", "flat"]
UNLABELED = -1


@dataclass(frozen=True)
class ImageRecord:
    """One image file found under the data root."""

    relpath: str  # relative to the data root, '/'-separated
    label: int  # index into ScanResult.classes, or -1 when unlabeled
    split: str  # "train", "val", "test", or "" when the folder is not pre-split
    size: int  # bytes, for incremental change detection
    mtime_ns: int
    container: str = ""  # a tar shard (relative to the root) holding the image as a member …
    offset: int = -1  # … whose bytes start here in it (read in place, never unpacked)


@dataclass(frozen=True)
class ScanFailure:
    """Something the scan found but cannot use (a truncated tar shard, a link member): recorded
    in the cache as a failed file with its fingerprint, so it is retried once it changes."""

    relpath: str
    reason: str
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    root: Path  # what record paths are relative to
    layout: str  # the resolved layout: "imagefolder", "split", "flat" or "manifest"
    classes: list[str]
    records: list[ImageRecord]
    skipped: list[tuple[str, str]]  # (relpath, reason) of things found but not usable
    source: Path | None = None  # the manifest file, when the images came from one
    columns: dict[str, str] | None = None  # the manifest's path/label/split column names
    spec: str | None = None  # a source that is not a path (torchvision:CIFAR10:/data/cifar10)
    failed: list[ScanFailure] = field(default_factory=list)  # found but unusable, recorded as failures (tar shards)

    @property
    def data_root(self) -> str:
        """What a cache records as its data: the folder, the manifest file, the shard pattern or the dataset spec."""
        return self.spec or str(self.source or self.root)


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(directory: Path) -> list[str]:
    """Class folder names, sorted, exactly as ImageFolder's ``find_classes``."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _walk_images(top: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``top`` in ImageFolder order, following symlinks but never a loop."""
    found: list[tuple[str, list[str]]] = []
    skipped: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()

    def onerror(err: OSError) -> None:
        skipped.append((str(err.filename), f"cannot list folder: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to a folder already read
            skipped.append((dirpath, "symlink loop or duplicate folder link; skipped"))
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        found.append((dirpath, filenames))
    files: list[str] = []
    for dirpath, filenames in sorted(found):  # ImageFolder sorts the walk tuples by folder path
        for name in sorted(filenames):
            if has_image_extension(name):
                files.append(os.path.join(dirpath, name))
    return files, skipped


def _stat_record(root: Path, path: str, label: int, split: str) -> ImageRecord | tuple[str, str]:
    rel = Path(os.path.relpath(path, root)).as_posix()
    problem = row_path_problem(rel)
    if problem:  # a name the file system holds but a row cannot (a path too long to store)
        return shown(rel), f"path {problem}"
    try:
        st = os.stat(path)
    except OSError as exc:  # dangling symlink, vanished file
        return rel, f"cannot stat: {exc.strerror}"
    return ImageRecord(rel, label, split, st.st_size, st.st_mtime_ns)


def resolve_layout(root: Path, layout: str = "auto") -> str:
    """Decide how ``root`` is organised; ``auto`` looks at its sub-folders."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    subdirs = set(find_classes(root))
    if "train" in subdirs and subdirs <= set(SPLIT_NAMES) and len(subdirs) >= 2:
        return "split"
    if subdirs:
        return "imagefolder"
    return "flat"


def check_data_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data folder {str(path)!r} does not exist; pass an existing image folder")
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} is a file, not a folder; pass the folder that holds the images")
    try:
        os.scandir(path).close()
    except PermissionError:
        raise DataError(f"data folder {str(path)!r} is not readable (permission denied); fix its permissions")
    return path.resolve()


def scan_folder(root: str | os.PathLike, layout: str = "auto") -> ScanResult:
    """List the images under ``root`` with labels, splits and fingerprints.

    Raises:
        DataError: the folder is missing, unreadable, or holds no image at all.
    """
    path = check_data_root(root)
    resolved = resolve_layout(path, layout)
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []

    def add(files: list[str], label_of: dict[str, int] | None, split: str, base: Path) -> None:
        for f in files:
            label = UNLABELED
            if label_of is not None:
                label = label_of[Path(os.path.relpath(f, base)).parts[0]]
            rec = _stat_record(path, f, label, split)
            (records if isinstance(rec, ImageRecord) else skipped).append(rec)

    if resolved == "flat":
        classes: list[str] = []
        files, skip = _walk_images(path)
        skipped += skip
        add(files, None, "", path)
    elif resolved == "imagefolder":
        classes = find_classes(path)
        label_of = {c: i for i, c in enumerate(classes)}
        for cls in classes:
            files, skip = _walk_images(path / cls)
            skipped += skip
            add(files, label_of, "", path)
    elif resolved == "split":
        split_dirs = [s for s in SPLIT_NAMES if (path / s).is_dir()]
        if "train" not in split_dirs:
            raise DataError(f"{str(path)!r} has no 'train' folder; a pre-split root needs train/ and val/ (test/ optional)")
        # Classes: the union over splits (equal to each split's ImageFolder classes in the
        # normal case where every split has the same class folders).
        classes = sorted(set().union(*(find_classes(path / s) for s in split_dirs)))
        label_of = {c: i for i, c in enumerate(classes)}
        for split in split_dirs:
            for cls in find_classes(path / split):
                files, skip = _walk_images(path / split / cls)
                skipped += skip
                add(files, label_of, split, path / split)
    else:  # pragma: no cover - resolve_layout validated it
        raise AssertionError(resolved)

    if not records:
        hint = "class sub-folders" if resolved != "flat" else "image files"
        raise DataError(
            f"no images found under {str(path)!r} (layout {resolved}); expected {hint} "
            f"with extensions {', '.join(IMG_EXTENSIONS)}"
        )
    return ScanResult(path, resolved, classes, records, skipped)
