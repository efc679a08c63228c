"""The store on its own (schema 2): commits, tombstones, adoption, compaction, snapshots,
damaged bytes, full disks, hostile names, and the schema-1 migration."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store.maintenance as maintenance_mod
import pipeline.store.writer as writer_mod
from pipeline import load_cache
from pipeline.errors import CacheError, DamagedCacheError, SnapshotGoneError, StorageError
from pipeline.store import CacheWriter, CompactionPolicy, PendingRow, iter_embeddings, new_cache_meta, parts_dir_for, read_rows, repair_cache, verify_cache
from pipeline.store.keyindex import KeyIndex
from pipeline.store.manifest import read_manifest

from schema1 import Schema1Writer
from sealing import rewrite_sealed

META = {"model": "m", "weights": "none", "preprocessing": {}, "embed_dim": 4, "dtype": "float32",
        "data_root": "/data", "layout": "imagefolder", "classes": ["a", "b"]}


def _rows(names, label=0):
    return [PendingRow(n, label, "", 1, 1, "0" * 64) for n in names]


def _emb(n, value=0.0):
    return np.full((n, 4), value, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None]


def _part_files(path):
    return sorted(p.name for p in parts_dir_for(path).glob("part-*.h5"))


def _three_single_row_parts(path: Path) -> CacheWriter:
    w = CacheWriter(path, META, policy=CompactionPolicy(auto=False))
    for i in range(3):
        w.add(_rows([f"a/{i}"]), _emb(1, i))
        w.commit()
    return w


def _no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_commit_read_back(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1", "a/2"]), _emb(2))
    w.commit()
    w.add(_rows(["b/3"], label=1), _emb(1, 10))
    w.add_failure("b/bad", "truncated image file", 5, 5)
    w.commit()
    c = load_cache(path)
    assert list(c.paths) == ["a/1", "a/2", "b/3"] and list(c.labels) == [0, 0, 1]
    np.testing.assert_array_equal(c.embeddings[2], [10, 10, 10, 10])
    assert c.failures == [("b/bad", "truncated image file")]
    assert len(_part_files(path)) == 2
    with h5py.File(path) as f:  # the manifest: one row per part, never one per image
        assert f.attrs["schema_version"] == 2 and f["parts/name"].shape == (2,)


def test_replace_remove_and_failure_transitions(tmp_path):
    """Each path has exactly one current state, the newest: row, failure or gone."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(auto=False))
    w.add(_rows(["a/1", "a/2", "a/3"]), _emb(3))
    w.commit()
    w.add(_rows(["a/1"]), _emb(1, 100))  # changed file: re-extracted
    w.add_failure("a/2", "truncated", 9, 9)  # changed and now unreadable: its old row goes
    w.remove(["a/3"])  # gone from disk
    w.commit()
    c = load_cache(path)
    assert list(c.paths) == ["a/1"] and c.embeddings[0, 0] == 100 and c.failures == [("a/2", "truncated")]
    w.add(_rows(["a/2"]), _emb(1, 200))  # fixed: the failure is replaced by a row
    w.add_failure("a/1", "now broken", 1, 1)
    w.add(_rows(["a/1"]), _emb(1, 300))  # ...and a later row of the same path in the same commit wins
    w.commit()
    c = load_cache(path)
    assert list(c.paths) == ["a/1", "a/2"] and c.failures == [] and list(c.embeddings[:, 0]) == [300, 200]
    m = read_manifest(path)
    assert sum(p.deleted for p in m.parts) == 4 and m.live_rows() == 2  # a/1 twice, a/2, a/3


def test_class_folders_added_later_keep_labels_by_name(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["b/1"], label=1), _emb(1))
    w.commit()
    w2 = CacheWriter(path, {**META, "classes": ["a", "aa", "b"]})  # a new class folder sorts in between
    w2.add(_rows(["aa/1"], label=1), _emb(1))
    w2.commit()
    c = load_cache(path)
    assert c.classes == ["a", "aa", "b"] and dict(zip(c.paths, c.labels.tolist())) == {"aa/1": 1, "b/1": 2}


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "manifest is damaged.*--repair"),
    (lambda p: p.write_text("hello"), "manifest is damaged.*--repair"),
    (lambda p: h5py.File(p, "w").close(), "not a featcache cache"),
])
def test_corrupt_or_foreign_manifest(tmp_path, damage, needle):
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
    rewrite_sealed(path, lambda f: f.attrs.__setitem__("schema_version", 99))
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


def test_disk_full_inside_a_write_keeps_the_previous_cache(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()

    def full_disk(*a, **k):  # the disk fills up under the write itself (the free-space check passed)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    w.add(_rows(["a/2"]), _emb(1))
    with pytest.raises(StorageError, match="disk is full.*nothing was changed"):
        w.commit()
    monkeypatch.undo()
    assert list(load_cache(path).paths) == ["a/1"] and _no_temporaries(tmp_path)
    assert w.commit() and list(load_cache(path).paths) == ["a/1", "a/2"]  # the buffer survived: the retry commits it


def test_space_is_reserved_before_hdf5_writes(tmp_path, monkeypatch):
    """ENOSPC at the reservation: the clean, early failure (HDF5 never writes into a full disk)."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(StorageError, match="disk is full"):
        w.commit()
    assert not path.exists() and _no_temporaries(tmp_path)


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
    assert list(load_cache(path).paths) == ["a/1"] and _no_temporaries(tmp_path)


def test_manifest_write_failure_after_part_leaves_a_part_the_next_writer_adopts(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1", "a/2"]), _emb(2))
    w.commit()

    def boom(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writer_mod, "write_manifest", boom)
    w.add(_rows(["a/2", "a/3"]), _emb(2, 50))  # replaces a/2: the orphan carries the tombstone
    with pytest.raises(OSError):
        w.commit()
    monkeypatch.undo()
    assert len(_part_files(path)) == 2  # the orphan part
    assert list(load_cache(path).paths) == ["a/1", "a/2"]  # readers see only what the manifest names
    w2 = CacheWriter(path, META)  # the part was complete and durable: the next writer adopts its rows
    c = load_cache(path)
    assert w2.adopted == 2 and list(c.paths) == ["a/1", "a/2", "a/3"] and list(c.embeddings[:, 0]) == [0, 50, 51]


def test_an_unlisted_merge_output_is_deleted_not_adopted(tmp_path, monkeypatch):
    """Killed after a merge wrote its output but before the manifest listed it: the inputs still
    hold those rows, so the next writer deletes the output instead of duplicating rows."""
    path = tmp_path / "c.h5"
    w = _three_single_row_parts(path)
    expected = load_cache(path)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(maintenance_mod, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        w.compact(full=True)
    monkeypatch.undo()
    assert len(_part_files(path)) == 4  # 3 listed + the unlisted merge output
    w2 = CacheWriter(path, META)
    assert w2.adopted == 0 and len(_part_files(path)) == 3
    after = load_cache(path)
    assert list(after.paths) == list(expected.paths) and np.array_equal(after.embeddings, expected.embeddings)


def test_staging_writers_parts_are_adopted_by_the_lock_holder(tmp_path):
    """The torchrun scheme: ranks write parts only; opening a normal writer adopts them all."""
    path = tmp_path / "c.h5"
    CacheWriter(path, META).commit()  # the lock holder creates the cache first
    for rank, names in ((0, ["a/1", "a/3"]), (1, ["a/2"])):
        s = CacheWriter(path, META, staging=True, tag=f"rank{rank}-")
        s.add(_rows(names), _emb(len(names), rank))
        s.add_failure(f"a/bad{rank}", "truncated", 1, 1)
        assert s.commit() and len(s.staged) == 1
        assert s.take_failures() == {f"a/bad{rank}": ("truncated", 1, 1)}
    assert list(load_cache(path).paths) == []  # nothing is visible until the lock holder adopts
    final = CacheWriter(path, META)
    assert final.adopted == 3 and list(load_cache(path).paths) == ["a/1", "a/2", "a/3"]


def test_full_compaction_keeps_current_rows_and_retires_the_rest(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(auto=False))
    for i in range(5):
        w.add(_rows(["a/1", f"a/x{i}"]), _emb(2, i))  # a/1 superseded each time
        w.commit()
    w.remove(["a/x0"])
    w.add_failure("a/bad", "broken", 1, 1)
    w.commit()
    before = load_cache(path)
    assert w.compact(full=True) == 1
    after = load_cache(path)
    assert list(after.paths) == list(before.paths) == ["a/1", "a/x1", "a/x2", "a/x3", "a/x4"]
    np.testing.assert_array_equal(after.embeddings, before.embeddings)
    assert after.failures == before.failures == [("a/bad", "broken")]
    assert len(_part_files(path)) == 1 and read_manifest(path).parts[0].deleted == 0


def test_size_tiered_compaction_bounds_parts_and_rewrites(tmp_path):
    """F = 4, 200 commits of 4 rows: parts stay within (F - 1) per tier, and each row is
    rewritten at most once per tier it climbs (log_F of the cache's size)."""
    path = tmp_path / "c.h5"
    fanout, commits, per = 4, 200, 4
    w = CacheWriter(path, META, policy=CompactionPolicy(fanout=fanout))
    for i in range(commits):
        w.add(_rows([f"a/{i}-{j}" for j in range(per)]), _emb(per, i))
        w.commit()
        tiers = {}
        for p in w.manifest.parts:
            tiers.setdefault(int(np.log(max(p.weight, 1)) / np.log(fanout) + 1e-9) if p.weight >= fanout else 0, []).append(p)
        assert all(len(v) < fanout for v in tiers.values()), [(t, len(v)) for t, v in tiers.items()]
    n = commits * per
    levels = int(np.ceil(np.log(n) / np.log(fanout)))
    assert w.stats.merged_rows <= n * levels
    assert len(w.manifest.parts) <= (fanout - 1) * (levels + 1)
    c = load_cache(path)
    assert len(c) == n and len(set(c.paths.tolist())) == n


def test_a_part_with_many_deleted_rows_is_rewritten_alone(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(fanout=8))
    w.add(_rows([f"a/{i}" for i in range(100)]), _emb(100))
    w.commit()
    big = w.manifest.parts[0].name
    w.add(_rows([f"a/{i}" for i in range(5)]), _emb(5, 7))  # 5 % deleted: kept as is
    w.commit()
    assert big in w.manifest.names()
    w.add(_rows([f"a/{i}" for i in range(5, 12)]), _emb(7, 7))  # 12 %: rewritten without its dead rows
    w.commit()
    assert big not in w.manifest.names() and all(p.deleted == 0 for p in w.manifest.parts)
    assert len(load_cache(path)) == 100


def test_content_digest_is_the_schema_1_definition(tmp_path):
    """Heads record it to tell whether a cache changed; computed without a Python object per
    row, it must equal the per-row hash schema 1 used (so heads do not all look stale)."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    sha = hashlib.sha256(b"x").hexdigest()
    w.add([PendingRow("b/é 2", 1, "", 1, 1, sha), PendingRow("a/1", 0, "", 1, 1, "")], _emb(2))
    w.commit()
    h = hashlib.sha256()
    ident = {k: META.get(k) for k in ("model", "weights", "preprocessing", "embed_dim", "dtype")}
    h.update(json.dumps([META["classes"], ident], sort_keys=True).encode())
    for p, label, s in [("a/1", 0, ""), ("b/é 2", 1, sha)]:
        h.update(f"{p}\0{label}\0{s}\n".encode())
    with read_rows(path) as table:
        assert table.content_digest() == h.hexdigest()[:32]


def test_hostile_file_names_round_trip(tmp_path):
    names = ["a/" + "\udcff\udcfe.png", "a/ünïcødé 字.jpg", "a/with space,comma;quote'.png", "a/" + "x" * 300 + ".png", "a/-rf .png"]
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(names), _emb(len(names)))
    w.commit()
    w.remove([names[2]])
    w.commit()
    c = load_cache(path)
    assert sorted(c.paths.tolist()) == sorted(n for n in names if n != names[2])
    assert os.fsencode(names[0]) in [os.fsencode(p) for p in c.paths.tolist()]  # the undecodable bytes survive


def test_public_writer_api_and_its_checks(tmp_path):
    path = tmp_path / "mine.h5"
    meta = new_cache_meta("my-clip", 4, ["cat", "dog"])
    with CacheWriter.open(path, meta) as w:
        w.add_columns(["cat/1.jpg", "dog/2.jpg"], np.eye(2, 4, dtype=np.float32), labels=[0, 1], split=["train", "val"])
        with pytest.raises(ValueError, match="shape"):
            w.add_columns(["cat/3.jpg"], np.zeros((1, 5), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            w.add_columns(["cat/3.jpg"], np.full((1, 4), np.nan, np.float32))
        with pytest.raises(ValueError, match="labels"):
            w.add_columns(["cat/3.jpg"], np.zeros((1, 4), np.float32), labels=[2])
    c = load_cache(path)
    assert list(c.paths) == ["cat/1.jpg", "dog/2.jpg"] and list(c.split) == ["train", "val"] and c.meta["model"] == "my-clip"


def test_a_reader_keeps_its_version_through_a_compaction(tmp_path):
    """Rows read with read_rows and fetched after a compaction are that version's rows (the
    schema-1 store returned another file's embeddings here, without an error)."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(auto=False))
    for i in range(4):
        w.add(_rows([f"a/{i}", "a/same"]), _emb(2, 10 * i))
        w.commit()
    table = read_rows(path)
    expected = load_cache(path).embeddings
    w.add(_rows(["a/0", "a/new"]), _emb(2, 99))  # a/0 replaced after the read
    w.commit()
    w.compact(full=True)
    got = np.concatenate([b for _, b in iter_embeddings(table, table.index_rows)])
    np.testing.assert_array_equal(got, expected)
    retired = [n for n, _ in read_manifest(path).garbage]
    assert retired and all((parts_dir_for(path) / n).exists() for n in retired)  # kept for the reader
    table.close()
    CacheWriter(path, META)  # the next writer deletes what no reader needs any more
    assert not any((parts_dir_for(path) / n).exists() for n in retired)


def test_a_reader_whose_version_vanished_fails_loudly(tmp_path):
    path = tmp_path / "c.h5"
    w = _three_single_row_parts(path)
    table = read_rows(path)
    table.snapshot.close()  # a reader the writer cannot see (another host, a read-only folder), its files not open yet
    w.compact(full=True)
    with pytest.raises(SnapshotGoneError, match="changed while it was being read"):
        list(iter_embeddings(table, table.index_rows))


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_part_are_named_never_wrong_numbers(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows([f"a/{i}" for i in range(2000)]), _emb(2000))
    w.commit()
    w.add(_rows(["a/extra"]), _emb(1, 5))
    w.commit()
    damaged = parts_dir_for(path) / read_manifest(path).parts[0].name
    _flip(damaged, damaged.stat().st_size // 2)
    with pytest.raises(DamagedCacheError, match=f"part {damaged.name} is damaged.*--repair"):
        load_cache(path)
    report = verify_cache(path)
    assert not report.ok and [d["part"] for d in report.damaged] == [damaged.name] and "SHA-256" in report.damaged[0]["problem"]
    fixed = repair_cache(path, META)
    assert [d["part"] for d in fixed.dropped] == [damaged.name]
    assert list(load_cache(path).paths) == ["a/extra"] and verify_cache(path).ok  # the rest is intact; extract re-fills the dropped rows


def test_random_damage_is_an_error_or_the_right_numbers_never_wrong_ones(tmp_path):
    """64 flipped bytes anywhere in a part, 40 times: every read either raises a CacheError or
    returns exactly what was written (damage in bytes a read does not touch, e.g. free space);
    verify flags every one of them."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows([f"a/{i}" for i in range(3000)]), np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32))
    w.add_failure("a/bad", "broken", 1, 1)
    w.commit()
    ref = load_cache(path)
    part = parts_dir_for(path) / _part_files(path)[0]
    clean = part.read_bytes()
    rng = np.random.default_rng(1)
    raised = 0
    for _ in range(40):
        part.write_bytes(clean)
        _flip(part, int(rng.integers(0, len(clean) - 64)))
        try:
            c = load_cache(path)
        except CacheError:
            raised += 1
        else:
            assert list(c.paths) == list(ref.paths) and np.array_equal(c.embeddings, ref.embeddings) and c.failures == ref.failures
            assert np.array_equal(c.fingerprints["sha256"], ref.fingerprints["sha256"]) and np.array_equal(c.labels, ref.labels)
        assert not verify_cache(path).ok
    assert raised >= 30  # most of a part's bytes are rows a read checks


def test_a_damaged_part_header_is_named(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META)
    w.add(_rows(["a/1"]), _emb(1))
    w.commit()
    part = parts_dir_for(path) / _part_files(path)[0]
    _flip(part, 100)
    with pytest.raises(DamagedCacheError, match=f"part {part.name} is damaged"):
        load_cache(path)


def test_a_damaged_manifest_is_rebuilt_from_the_parts(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(fanout=2))
    for i in range(5):
        w.add(_rows([f"a/{i}", "a/same"]), _emb(2, i))
        w.add_failure(f"b/bad{i}", "broken", 1, 1)
        w.commit()
    expected = load_cache(path)
    _flip(path, path.stat().st_size // 2, 256)
    with pytest.raises(CacheError):
        load_cache(path)
    report = repair_cache(path, META)
    assert report.rebuilt_manifest
    c = load_cache(path)
    assert list(c.paths) == list(expected.paths) and np.array_equal(c.embeddings, expected.embeddings) and c.failures == expected.failures


@pytest.mark.parametrize("seed", [0, 1])
def test_key_index_agrees_with_a_dict(seed):
    rng = np.random.default_rng(seed)
    ref: dict[tuple[int, int], tuple[int, int]] = {}
    pool = rng.integers(0, 2**63, size=(3000, 2), dtype=np.uint64)
    pool[:40, 0] = pool[40:80, 0]  # 64-bit collisions of the high half
    index = KeyIndex.build(pool[:1000], np.zeros(1000, np.int32), np.arange(1000))
    ref.update({(int(h), int(lo)): (0, i) for i, (h, lo) in enumerate(pool[:1000])})
    for step in range(200):
        keys = pool[rng.integers(0, len(pool), 50)]
        keys = np.unique(keys, axis=0)
        uid, row = index.lookup(keys)
        for (h, lo), u, r in zip(keys.tolist(), uid.tolist(), row.tolist()):
            assert ref.get((h, lo), (-1, -1)) == (u, r)
        if step % 3 == 0:
            index.delete(keys)
            for h, lo in keys.tolist():
                ref.pop((h, lo), None)
        else:
            index.delete(keys)
            index.insert(keys, step, np.arange(len(keys)))
            ref.update({(h, lo): (step, i) for i, (h, lo) in enumerate(keys.tolist())})
        if step % 50 == 0:
            index._merge_delta()
    assert len(index) == len(ref)


def test_schema_1_cache_is_read_then_migrated_by_the_first_write(tmp_path):
    path = tmp_path / "old.h5"
    v1 = Schema1Writer(path, META)
    v1.add(["a/1", "a/2", "b/3"], _emb(3), labels=[0, 0, 1], split=["train", "val", ""], sha256=["ab" * 32, "", "cd" * 32])
    v1.commit()
    v1.add(["a/2"], _emb(1, 50), labels=[0])  # a/2 changed
    v1.add_failure("b/bad", "truncated")
    v1.commit()
    before = load_cache(path)  # schema 1 read as it is
    assert list(before.paths) == ["a/1", "a/2", "b/3"] and list(before.embeddings[:, 0]) == [0, 50, 2] and before.failures == [("b/bad", "truncated")]
    digest = read_rows(path).content_digest()
    with h5py.File(path) as f:
        old_parts = [n.decode() for n in f["parts/names"][...]]
    w = CacheWriter(path, META)  # the first write migrates
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 2
    after = load_cache(path)
    assert list(after.paths) == list(before.paths) and np.array_equal(after.embeddings, before.embeddings)
    assert list(after.split) == list(before.split) and after.failures == before.failures and after.labels.tolist() == before.labels.tolist()
    assert read_rows(path).content_digest() == digest  # heads fitted on the schema-1 cache stay fresh
    assert not any((parts_dir_for(path) / n).exists() for n in old_parts) and verify_cache(path).ok
    w.add(_rows(["a/4"]), _emb(1))
    w.commit()
    assert len(load_cache(path)) == 4


def test_schema_1_lost_commit_is_kept_by_the_migration(tmp_path, monkeypatch):
    """A schema-1 writer killed between its part and its index: schema 1 adopted such a part;
    the migration keeps its rows too."""
    path = tmp_path / "old.h5"
    v1 = Schema1Writer(path, META)
    v1.add(["a/1"], _emb(1))
    v1.commit()
    monkeypatch.setattr(v1, "_write_index", lambda: None)  # the kill: the index never hears of the part
    v1.add(["a/1", "a/2"], _emb(2, 7))
    v1.commit()
    monkeypatch.undo()
    assert list(load_cache(path).paths) == ["a/1"]
    CacheWriter(path, META)
    c = load_cache(path)
    assert list(c.paths) == ["a/1", "a/2"] and list(c.embeddings[:, 0]) == [7, 8]


def test_sorted_reads_equal_gathered_reads_across_parts(tmp_path):
    """``read_sorted_into`` (a stream's chunk in storage order: one span read, one take) gives
    the rows ``read`` gives, for runs, gaps of every size and ids across several parts."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, META, policy=CompactionPolicy(auto=False))
    rng = np.random.default_rng(0)
    for k in range(3):
        w.add_columns([f"a/{k}-{i:04d}.jpg" for i in range(700)], rng.normal(size=(700, 4)).astype(np.float32))
        w.commit()
    w.close()
    with read_rows(path) as table:
        snap = table.snapshot
        assert len(snap.parts) == 3
        ids = np.sort(rng.choice(2100, 900, replace=False))
        ids = np.union1d(ids, np.arange(1000, 1400))  # a long run, across the part boundary at 1,400
        for chosen in (ids, np.arange(2100), ids[::300], ids[:1]):
            out = np.full((len(chosen), 4), np.nan, dtype=np.float32)
            snap.read_sorted_into(out, chosen)
            np.testing.assert_array_equal(out, snap.read(chosen))
