"""Sealed store files (issue #28): no byte of a cache reaches HDF5's parser before its
checksum matches, so damage is always exit 5 naming the file — never other labels, another
provenance, or a parser looping forever — and `extract --repair` rebuilds from what can be
trusted."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import load_cache
from pipeline.errors import DamagedCacheError, IncompatibleError
from pipeline.store import CacheWriter, new_cache_meta, parts_dir_for, read_cache_meta, repair_cache, verify_cache
from pipeline.store.manifest import read_manifest
from pipeline.store.seal import SEAL_BYTES, frame_spans, parse_chunk_list, read_seal

from sealing import unseal_cache

CLASSES = ["a", "b", "c"]


def _meta(**extra) -> dict:
    return new_cache_meta("resnet18", 8, CLASSES, weights="none", seed=0, preprocessing={"crop_size": [224]}, data_root="/data",
                          layout="imagefolder", **extra)


def _cache(path: Path, per_class: int = 30, commits: int = 1) -> Path:
    rng = np.random.default_rng(0)
    w = CacheWriter(path, _meta())
    for k in range(commits):
        paths = [f"{c}/{k}-{i}.png" for c in CLASSES for i in range(per_class)]
        w.add_columns(paths, rng.standard_normal((len(paths), 8)).astype(np.float32), labels=[CLASSES.index(p[0]) for p in paths],
                      sha256=rng.integers(0, 256, (len(paths), 32), dtype=np.uint8))
        w.commit()
    return path


def _parts(path: Path) -> list[Path]:
    return [parts_dir_for(path) / p.name for p in read_manifest(path).parts]


def _same(a, b) -> bool:
    return (list(a.paths) == list(b.paths) and np.array_equal(a.labels, b.labels) and np.array_equal(a.embeddings, b.embeddings)
            and a.classes == b.classes and a.meta == b.meta and np.array_equal(a.fingerprints["sha256"], b.fingerprints["sha256"]))


def _xor(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_parts_class_names_is_damage_not_other_labels(tmp_path):
    """The issue's repro: the part's class names live in an attribute HDF5 does not checksum;
    'a' rows used to read back as 'c' rows."""
    path = _cache(tmp_path / "c.h5")
    part = _parts(path)[0]
    at = part.read_bytes().find(b'"classes": ["a"')
    assert at > 0
    _xor(part, at + 13, 2)  # "a" -> "c"
    with pytest.raises(DamagedCacheError, match=f"part {part.name} is damaged"):
        load_cache(path)
    assert not verify_cache(path).ok


@pytest.mark.parametrize("needle,change", [(b'"seed": 0', (8, 1)), (b'"embed_dim": 8', (13, 1)), (b'"dtype": "float32"', (13, 2))])
def test_a_flipped_bit_in_the_manifests_provenance_is_damage_and_repair_takes_the_parts_own(tmp_path, needle, change):
    """seed 0 -> 1 used to pass verify and give a head another random backbone; embed_dim or
    dtype flips passed verify and then crashed fit-head, and --repair refused to rebuild."""
    path = _cache(tmp_path / "c.h5", commits=2)
    reference = load_cache(path)
    at = path.read_bytes().find(needle)
    assert at > 0
    _xor(path, at + change[0], change[1])
    with pytest.raises(DamagedCacheError, match="manifest is damaged.*--repair"):
        load_cache(path)
    report = verify_cache(path)
    assert not report.ok and "SHA-256" in report.manifest_damaged
    repaired = repair_cache(path, _meta())
    assert repaired.rebuilt_manifest and not repaired.dropped
    assert _same(load_cache(path), reference) and verify_cache(path).ok and read_cache_meta(path)["seed"] == 0


def test_a_rebuild_refuses_parts_of_another_backbone_than_this_run(tmp_path):
    path = _cache(tmp_path / "c.h5")
    _xor(path, path.stat().st_size - 1, 1)  # the manifest is damaged, the parts are fine
    with pytest.raises(IncompatibleError, match="seed 0.*seed 3"):
        repair_cache(path, {**_meta(), "seed": 3})


def test_every_bit_flip_in_the_parsed_bytes_of_a_part_is_caught_before_parsing(tmp_path):
    """One flip at a time over a sample of the bytes HDF5 parses (the frame), the seal, the
    chunk list and the data chunks: each read raises DamagedCacheError or returns exactly the
    reference — never other rows, never another exception (the issue's hangs came from such
    flips). bench/faults.py sweeps every 7th byte."""
    path = _cache(tmp_path / "c.h5", per_class=4)
    reference = load_cache(path)
    part = _parts(path)[0]
    clean = part.read_bytes()
    with open(part, "rb") as fh:
        seal = read_seal(fh.fileno(), len(clean))
    spans = frame_spans(parse_chunk_list(clean[seal.chunks_at :], seal), SEAL_BYTES, seal.chunks_at)
    frame = [o for a, b in spans for o in range(a, b)]
    offsets = list(range(0, SEAL_BYTES, 11)) + frame[::41] + list(range(seal.chunks_at, len(clean), 3)) + list(range(SEAL_BYTES, len(clean), 211))
    caught = 0
    for k, offset in enumerate(sorted(set(offsets))):
        damaged = bytearray(clean)
        damaged[offset] ^= 1 << (k % 8)
        part.write_bytes(bytes(damaged))
        try:
            c = load_cache(path)
        except DamagedCacheError:
            caught += 1
        else:
            assert _same(c, reference), offset
    assert caught >= 0.95 * len(set(offsets))
    part.write_bytes(clean)
    assert _same(load_cache(path), reference)


def test_bit_flips_anywhere_in_the_manifest_are_damage_never_a_wrong_answer(tmp_path):
    """Every 23rd byte (bench/faults.py sweeps every 3rd), the whole seal included by the stride's drift."""
    path = _cache(tmp_path / "c.h5")
    clean = path.read_bytes()
    for k, offset in enumerate(range(0, len(clean), 23)):
        damaged = bytearray(clean)
        damaged[offset] ^= 1 << (k % 8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(DamagedCacheError, match="manifest is damaged"):
            read_manifest(path)
    path.write_bytes(clean)


def test_repair_names_the_damaged_parts_it_leaves_out_of_a_rebuilt_manifest(tmp_path):
    path = _cache(tmp_path / "c.h5", commits=2)
    first, second = _parts(path)
    kept = {p for p in load_cache(path).paths if p.split("/")[1].startswith("1-")}
    _xor(path, path.stat().st_size // 2, 4)
    _xor(first, first.stat().st_size // 2, 4)
    report = repair_cache(path, _meta())
    assert report.rebuilt_manifest and [d["part"] for d in report.dropped] == [first.name]
    assert set(load_cache(path).paths) == kept and verify_cache(path).ok


def test_caches_written_before_seals_are_read_and_their_parts_checked_by_the_manifests_digest(tmp_path):
    path = _cache(tmp_path / "c.h5", commits=2)
    reference = load_cache(path)
    unseal_cache(path)
    assert path.read_bytes()[:4] == b"\x89HDF" and _same(load_cache(path), reference) and verify_cache(path).ok
    part = _parts(path)[1]
    _xor(part, part.stat().st_size // 2, 8)
    with pytest.raises(DamagedCacheError, match=f"part {part.name} is damaged.*SHA-256"):
        load_cache(path)
    part_bytes = bytearray(part.read_bytes())
    part_bytes[part.stat().st_size // 2] ^= 8
    part.write_bytes(bytes(part_bytes))
    w = CacheWriter(path, _meta())  # the next commit seals the manifest it writes
    w.add_columns(["a/new.png"], np.zeros((1, 8), np.float32), labels=[0])
    w.commit()
    assert path.read_bytes().startswith(b"featcache-seal 1\n") and len(load_cache(path)) == len(reference) + 1


def test_plain_h5py_still_reads_a_sealed_cache(tmp_path):
    """The seal is an HDF5 user block: other tools open the manifest and parts as before."""
    path = _cache(tmp_path / "c.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["model"] == "resnet18" and json.loads(f.attrs["meta_json"])["classes"] == CLASSES
    with h5py.File(_parts(path)[0], "r") as f:
        assert f["embeddings"].shape == (90, 8)
