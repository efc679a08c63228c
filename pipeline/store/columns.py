"""Per-row columns as numpy arrays, and how each is encoded on disk.

Rows travel through the store as columns (never one Python object per row): paths as
UTF-8 bytes (``surrogateescape``, so any file name the OS gives round-trips), labels and
split as small integers, file fingerprints, and a 128-bit path key (BLAKE2b) that the
writer's index uses to find a path's current row without holding the paths in memory.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS: tuple[str, ...] = ("", "train", "val", "test")  # split column codes 0..3
SHA_BYTES = 32
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def encode_paths(paths: Iterable[str]) -> np.ndarray:
    """``str`` paths -> fixed-width UTF-8 bytes (``S``); undecodable names keep their bytes."""
    data = [p.encode("utf-8", "surrogateescape") for p in paths]
    return np.array(data, dtype="S") if data else np.zeros(0, dtype="S1")


def decode_strings(raw: np.ndarray) -> np.ndarray:
    """UTF-8 bytes -> a numpy string array (StringDType: no Python object per row); names that
    are not valid UTF-8 fall back to an object array of ``surrogateescape`` strings."""
    raw = np.ascontiguousarray(raw)
    if not raw.size or (raw.view(np.uint8) < 0x80).all():  # ASCII: numpy's cast is exact
        return raw.astype(np.dtypes.StringDType())
    try:
        return np.strings.decode(raw, "utf-8").astype(np.dtypes.StringDType())
    except UnicodeDecodeError:
        return np.array([b.decode("utf-8", "surrogateescape") for b in raw.tolist()], dtype=object)


def path_keys(paths: np.ndarray) -> np.ndarray:
    """[n, 2] uint64: the 128-bit BLAKE2b digest of each encoded path. Two paths share a key
    with probability ~n²/2¹²⁹ (1e-25 at 10 M rows), so the key stands for the path."""
    out = np.empty((len(paths), 2), dtype=np.uint64)
    if len(paths):
        digests = b"".join(hashlib.blake2b(p, digest_size=16).digest() for p in paths.tolist())
        out[:] = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    return out


def split_codes(splits: Iterable[str]) -> np.ndarray:
    try:
        return np.array([_SPLIT_CODE[s] for s in splits], dtype=np.uint8)
    except KeyError as exc:
        raise ValueError(f"split {exc.args[0]!r} is not one of {', '.join(repr(s) for s in SPLITS)}") from None


def split_names(codes: np.ndarray) -> np.ndarray:
    """Codes -> a ``U5`` string array (a gather of fixed-width strings: fast at 10 M rows)."""
    return np.array(SPLITS, dtype="U5")[np.asarray(codes, dtype=np.intp)]


def sha_raw(hexes: Sequence[str]) -> np.ndarray:
    """Hex SHA-256 strings -> [n, 32] uint8 (an empty string, for "not hashed", is all zeros)."""
    zero = bytes(SHA_BYTES)
    blob = b"".join(bytes.fromhex(h) if h else zero for h in hexes)
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, SHA_BYTES).copy() if hexes else np.zeros((0, SHA_BYTES), np.uint8)


def sha_hex(raw: np.ndarray) -> np.ndarray:
    """[n, 32] uint8 -> hex as ``S64`` bytes (all zeros -> empty), vectorised."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1, SHA_BYTES)
    out = np.ascontiguousarray(_HEX[raw]).view("S64").reshape(-1)
    out[~raw.any(axis=1)] = b""
    return out


def joined_rows(columns: Sequence[np.ndarray | bytes]) -> bytes:
    """Row by row, the concatenation of ``columns`` (``S`` arrays of equal length, each value
    without its NUL padding, or ``bytes`` literals repeated on every row): what
    ``b"".join(a + b"\\0" + b + … for each row)`` gives, without a Python object per row."""
    n = next(len(c) for c in columns if not isinstance(c, bytes))
    mats, masks = [], []
    for col in columns:
        if isinstance(col, bytes):
            lit = np.frombuffer(col, dtype=np.uint8)
            mats.append(np.broadcast_to(lit, (n, len(lit))))
            masks.append(np.ones((n, len(lit)), bool))
            continue
        col = np.ascontiguousarray(col)
        width = col.dtype.itemsize
        mats.append(col.view(np.uint8).reshape(n, width))
        masks.append(np.arange(width)[None, :] < np.strings.str_len(col)[:, None])
    return np.concatenate(mats, axis=1)[np.concatenate(masks, axis=1)].tobytes()


@dataclass
class RowColumns:
    """Rows to write (or read back from a part): one array per column, all of length n."""

    paths: np.ndarray  # S, UTF-8
    labels: np.ndarray  # int32, index into the classes the rows were written with; -1 unlabeled
    split: np.ndarray  # uint8 codes into SPLITS
    size: np.ndarray  # int64 bytes
    mtime_ns: np.ndarray  # int64
    sha256: np.ndarray  # [n, 32] uint8
    keys: np.ndarray  # [n, 2] uint64 (path_keys)

    NAMES = ("paths", "labels", "split", "size", "mtime_ns", "sha256", "keys")

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: np.ndarray | slice) -> RowColumns:
        return RowColumns(*(getattr(self, n)[index] for n in self.NAMES))

    @classmethod
    def empty(cls) -> RowColumns:
        return cls(np.zeros(0, "S1"), np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros((0, SHA_BYTES), np.uint8), np.zeros((0, 2), np.uint64))

    @classmethod
    def concat(cls, parts: Sequence[RowColumns]) -> RowColumns:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        width = max(p.paths.dtype.itemsize for p in parts)
        cols = {n: np.concatenate([getattr(p, n) for p in parts]) for n in cls.NAMES if n != "paths"}
        return cls(np.concatenate([p.paths.astype(f"S{width}") for p in parts]), **cols)

    @classmethod
    def build(cls, paths: Sequence[str] | np.ndarray, labels=None, split=None, size=None, mtime_ns=None, sha256=None) -> RowColumns:
        """Columns from plain Python values; missing ones get their neutral value (unlabeled,
        no split, size/mtime 0, not hashed)."""
        enc = paths if isinstance(paths, np.ndarray) and paths.dtype.kind == "S" else encode_paths(paths)
        n = len(enc)
        labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, dtype=np.int32)
        split = np.zeros(n, np.uint8) if split is None else (np.asarray(split, np.uint8) if _is_codes(split) else split_codes(split))
        size = np.zeros(n, np.int64) if size is None else np.asarray(size, dtype=np.int64)
        mtime_ns = np.zeros(n, np.int64) if mtime_ns is None else np.asarray(mtime_ns, dtype=np.int64)
        if sha256 is None:
            sha = np.zeros((n, SHA_BYTES), np.uint8)
        elif isinstance(sha256, np.ndarray) and sha256.dtype == np.uint8:
            sha = sha256.reshape(n, SHA_BYTES)
        else:
            sha = sha_raw(list(sha256))
        cols = cls(enc, labels, split, size, mtime_ns, sha, path_keys(enc))
        for name in cls.NAMES:
            if len(getattr(cols, name)) != n:
                raise ValueError(f"column {name!r} has {len(getattr(cols, name))} values for {n} paths")
        return cols


def _is_codes(split) -> bool:
    return isinstance(split, np.ndarray) and split.dtype.kind in "ui"


@dataclass
class FailureColumns:
    """Files that could not be embedded, and why."""

    paths: np.ndarray  # S
    reasons: np.ndarray  # S, UTF-8
    size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64
    keys: np.ndarray  # [n, 2] uint64

    NAMES = ("paths", "reasons", "size", "mtime_ns", "keys")

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: np.ndarray | slice) -> FailureColumns:
        return FailureColumns(*(getattr(self, n)[index] for n in self.NAMES))

    @classmethod
    def build(cls, items: Sequence[tuple[str, str, int, int]]) -> FailureColumns:
        """From ``(path, reason, size, mtime_ns)`` tuples."""
        paths = encode_paths([p for p, _, _, _ in items])
        reasons = np.array([r.encode("utf-8", "surrogateescape") for _, r, _, _ in items], dtype="S") if items else np.zeros(0, "S1")
        return cls(paths, reasons, np.array([s for _, _, s, _ in items], dtype=np.int64),
                   np.array([m for _, _, _, m in items], dtype=np.int64), path_keys(paths))

    @classmethod
    def concat(cls, parts: Sequence[FailureColumns]) -> FailureColumns:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.build([])
        out = {}
        for n in cls.NAMES:
            arrays = [getattr(p, n) for p in parts]
            if arrays[0].dtype.kind == "S":
                width = max(a.dtype.itemsize for a in arrays)
                arrays = [a.astype(f"S{width}") for a in arrays]
            out[n] = np.concatenate(arrays)
        return cls(**out)

    def items(self) -> list[tuple[str, str, int, int]]:
        return [(p.decode("utf-8", "surrogateescape"), r.decode("utf-8", "surrogateescape"), int(s), int(m))
                for p, r, s, m in zip(self.paths.tolist(), self.reasons.tolist(), self.size.tolist(), self.mtime_ns.tolist())]


@dataclass
class Tombstones:
    """Deletions a commit records against rows of older parts: ``(target part, kind, row)``
    with kind 0 = an embedded row, 1 = a failure record. Targets are part names, which are
    never reused, so a tombstone whose part was compacted away simply stops applying."""

    targets: list[str]
    target_index: np.ndarray  # int32 into targets
    kind: np.ndarray  # uint8
    row: np.ndarray  # int64

    ROW, FAILURE = 0, 1

    def __len__(self) -> int:
        return len(self.row)

    @classmethod
    def empty(cls) -> Tombstones:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64))

    @classmethod
    def from_triples(cls, triples: Iterable[tuple[str, int, int]]) -> Tombstones:
        """From ``(target name, kind, row)``; duplicates collapse."""
        names: dict[str, int] = {}
        rows = sorted({(names.setdefault(t, len(names)), int(k), int(r)) for t, k, r in triples})
        if not rows:
            return cls.empty()
        arr = np.array(rows, dtype=np.int64)
        return cls(list(names), arr[:, 0].astype(np.int32), arr[:, 1].astype(np.uint8), arr[:, 2])

    def triples(self) -> list[tuple[str, int, int]]:
        return [(self.targets[t], k, r) for t, k, r in zip(self.target_index.tolist(), self.kind.tolist(), self.row.tolist())]

    def by_target(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """target name -> (deleted rows, deleted failure rows)."""
        out = {}
        for i, name in enumerate(self.targets):
            sel = self.target_index == i
            out[name] = (self.row[sel & (self.kind == self.ROW)], self.row[sel & (self.kind == self.FAILURE)])
        return out

    def keep_targets(self, names: set[str]) -> Tombstones:
        """Only the tombstones whose target is in ``names``."""
        return Tombstones.from_triples(t for t in self.triples() if t[0] in names)


def remap_labels(labels: np.ndarray, have: list[str], want: list[str]) -> np.ndarray:
    """Labels indexing ``have`` -> indexing ``want`` (by class name; a class gone becomes -1)."""
    labels = labels.astype(np.int64)
    if have == want or not len(labels):
        return labels
    pos = {c: i for i, c in enumerate(want)}
    table = np.array([pos.get(c, -1) for c in have] + [-1], dtype=np.int64)  # index -1 -> the trailing -1
    return table[labels]
