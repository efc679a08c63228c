"""The HDF5 cache on its own: bad files, moved caches, disk full, compaction."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store.writer as cache_mod
from pipeline import load_cache
from pipeline.errors import CacheError, StorageError
from pipeline.store.schema import parts_dir_for
from pipeline.store.writer import CacheWriter, PendingRow

META = {"model": "m", "weights": "none", "preprocessing": {}, "embed_dim": 4, "dtype": "float32",
        "data_root": "/data", "layout": "imagefolder", "classes": ["a", "b"]}


def _rows(names, label=0):
    return [PendingRow(n, label, "", 1, 1, "0" * 64) for n in names]


def _emb(n, value=0.0):
    return np.full((n, 4), value, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None]


def test_commit_read_back(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1", "a/2"]), _emb(2))
    w.commit()
    w.add(_rows(["b/3"], label=1), _emb(1, 10))
    w.add_failure("b/bad", "truncated image file", 5, 5)
    w.commit()
    c = load_cache(path)
    assert c.paths == ["a/1", "a/2", "b/3"] and list(c.labels) == [0, 0, 1]
    np.testing.assert_array_equal(c.embeddings[2], [10, 10, 10, 10])
    assert c.failures == [("b/bad", "truncated image file")]
    assert len(list(parts_dir_for(path).iterdir())) == 2


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable HDF5"),
    (lambda p: p.write_text("hello"), "not a readable HDF5"),
    (lambda p: h5py.File(p, "w").close(), "not a featcache cache"),
])
def test_corrupt_or_foreign_index(tmp_path, damage, needle):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()
    damage(path)
    with pytest.raises(CacheError, match=needle):
        load_cache(path)


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.commit()
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema 99.*upgrade"):
        load_cache(path)


def test_moved_cache_still_reads_and_missing_parts_are_named(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1, 3))
    w.commit()
    moved = tmp_path / "elsewhere" / "c.h5"
    moved.parent.mkdir()
    shutil.move(path, moved)
    shutil.move(parts_dir_for(path), parts_dir_for(moved))
    np.testing.assert_array_equal(load_cache(moved).embeddings, [[3, 3, 3, 3]])
    shutil.rmtree(parts_dir_for(moved))
    with pytest.raises(CacheError, match="missing 1 part file"):
        load_cache(moved)


def test_disk_full_keeps_previous_cache(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()
    real = os.write

    def full_disk(fd, data):  # the disk fills up under the write itself (the free-space check passed)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr("builtins.open", _open_unbuffered_with(real))
    w.add(_rows(["a/2"]), _emb(1))
    with pytest.raises(StorageError, match="disk is full.*nothing was changed"):
        w.commit()
    monkeypatch.undo()
    c = load_cache(path)
    assert c.paths == ["a/1"]
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def _open_unbuffered_with(write):
    """``open`` whose binary writes go through ``os.write`` (so a patched one sees them)."""
    import builtins
    import io

    real_open = builtins.open

    class Raw(io.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def writable(self):
            return True

        def write(self, b):
            return os.write(self.fh.fileno(), bytes(b))

        def fileno(self):
            return self.fh.fileno()

        def close(self):
            self.fh.close()
            super().close()

    def patched(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Raw(fh) if "w" in mode and "b" in mode else fh

    return patched


def test_free_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    import pipeline.store.atomic as atomic

    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 100_000)
    w.add(_rows(["a/2"]), _emb(1))
    with pytest.raises(StorageError, match=r"disk is full \(98 KiB free, about 1.*needed\); nothing was changed"):
        w.commit()
    monkeypatch.undo()
    assert load_cache(path).paths == ["a/1"] and not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_index_write_failure_after_part_leaves_a_part_the_next_writer_adopts(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()

    def boom(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod, "_write_index", boom)
    w.add(_rows(["a/2"]), _emb(1))
    with pytest.raises(OSError):
        w.commit()
    monkeypatch.undo()
    assert len(list(parts_dir_for(path).iterdir())) == 2  # the orphan part
    assert load_cache(path).paths == ["a/1"]  # readers see only what the index names
    w2 = CacheWriter(path, META)  # the part was complete and durable: the next writer adopts its rows
    assert w2.adopted == 1 and load_cache(path).paths == ["a/1", "a/2"]
    assert len(list(parts_dir_for(path).iterdir())) == 2


def test_compaction_leftovers_are_deleted_not_adopted(tmp_path, monkeypatch):
    """Killed after a compaction replaced the index but before deleting the old parts: those
    parts predate the index, so the next writer deletes them instead of resurrecting old rows."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    for i in range(3):
        w.add(_rows(["a/1"]), _emb(1, i))
        w.commit()
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # the kill: no deletions happen
    assert w.compact(min_parts=2)
    monkeypatch.undo()
    assert len(list(parts_dir_for(path).iterdir())) == 4  # 3 old + 1 compacted
    expected = load_cache(path).embeddings.copy()
    w2 = CacheWriter(path, META)
    assert w2.adopted == 0 and len(list(parts_dir_for(path).iterdir())) == 1
    np.testing.assert_array_equal(load_cache(path).embeddings, expected)


def test_staging_writers_parts_are_adopted_by_the_lock_holder(tmp_path):
    """The torchrun scheme: ranks write parts only; opening a normal writer adopts them all."""
    path = tmp_path / "c.h5"
    CacheWriter(path, META).commit()  # the lock holder creates the index first
    for rank, names in ((0, ["a/1", "a/3"]), (1, ["a/2"])):
        s = CacheWriter(path, META, staging=True, tag=f"rank{rank}-")
        s.add(_rows(names), _emb(len(names), rank))
        s.add_failure(f"a/bad{rank}", "truncated", 1, 1)
        assert s.commit() and len(s.staged) == 1
        assert s.take_failures() == {f"a/bad{rank}": ("truncated", 1, 1)}
    assert load_cache(path).paths == []  # nothing is visible until the lock holder adopts
    final = CacheWriter(path, META)
    assert final.adopted == 3 and load_cache(path).paths == ["a/1", "a/2", "a/3"]


def test_compaction_keeps_current_rows(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    for i in range(5):
        w.add(_rows(["a/1", f"a/x{i}"]), _emb(2, i))  # a/1 superseded each time
        w.commit()
    w.remove(["a/x0"])
    w.commit()
    before = load_cache(path)
    assert w.compact(min_parts=3)
    after = load_cache(path)
    assert after.paths == before.paths == ["a/1", "a/x1", "a/x2", "a/x3", "a/x4"]
    np.testing.assert_array_equal(after.embeddings, before.embeddings)
    assert len(list(parts_dir_for(path).iterdir())) == 1
