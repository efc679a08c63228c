"""The HDF5 cache on its own: bad files, moved caches, disk full, compaction."""
from __future__ import annotations

import errno
import shutil

import h5py
import numpy as np
import pytest

import pipeline.cache as cache_mod
from pipeline import load_cache
from pipeline.cache import CacheWriter, PendingRow, parts_dir_for
from pipeline.errors import CacheError, StorageError

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
    real = cache_mod.h5py.File

    def full_disk(name, mode="r", *a, **k):
        if mode == "w":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(name, mode, *a, **k)

    monkeypatch.setattr(cache_mod.h5py, "File", full_disk)
    w.add(_rows(["a/2"]), _emb(1))
    with pytest.raises(StorageError, match="disk is full.*nothing was changed"):
        w.commit()
    monkeypatch.undo()
    c = load_cache(path)
    assert c.paths == ["a/1"]
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_index_write_failure_after_part_leaves_orphan_that_is_cleaned(tmp_path, monkeypatch):
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
    assert load_cache(path).paths == ["a/1"]  # not committed: the index never named it
    CacheWriter(path, META)  # the next writer cleans up
    assert len(list(parts_dir_for(path).iterdir())) == 1


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
