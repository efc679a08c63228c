"""The store's promises as a user meets them on the command line: damaged bytes are exit 5
naming the part (never wrong numbers), `verify` checks a whole cache, `extract --repair`
mends it, and a schema-1 cache is read by every command, then migrated by the next extract."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.store import parts_dir_for
from pipeline.store.manifest import read_manifest

from conftest import cli_json, run_cli
from schema1 import Schema1Writer

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(tmp_path, digits_small, tiny_hub):
    out = tmp_path / "c.h5"
    args = ("-m", tiny_hub, "-w", "none", "--workers", "0", "--batch-size", "8", "--commit-every", "16")
    proc = run_cli("extract", str(digits_small), *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, (str(digits_small), *args, "--out", str(out))


def _embeddings_offset(part: Path) -> int:
    """The middle of a part's embedding bytes (what every head reads)."""
    import h5py

    with h5py.File(part) as f:
        info = f["embeddings"].id.get_chunk_info(0)
        return info.byte_offset + info.size // 2 - 32


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_error(proc, *words):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_flipped_bytes_are_exit_5_naming_the_part_and_repair_extracts_them_again(tmp_path, cache):
    out, extract_args = cache
    head = tmp_path / "h.pt"
    assert run_cli("fit-head", str(out), "--clf", "logreg", "--out", str(head)).returncode == 0
    ref = load_cache(out)
    big = max(read_manifest(out).parts, key=lambda p: p.rows)
    part = parts_dir_for(out) / big.name
    _flip(part, _embeddings_offset(part))  # the adversarial run's XOR of 64 bytes in a part's embeddings
    for args in (("fit-head", str(out), "--clf", "linear", "--out", str(tmp_path / "h2.pt")), ("evaluate", str(head), "--cache", str(out)),
                 ("status", str(out))):
        proc = run_cli(*args)
        assert proc.returncode == 5, (args, proc.returncode, proc.stderr)
        _one_error(proc, big.name, "damaged", "--repair")
    report = cli_json("verify", str(out), expect=5)
    assert not report["ok"] and [d["part"] for d in report["damaged"]] == [big.name]
    proc = run_cli("verify", str(out))
    assert proc.returncode == 5 and f"DAMAGED {big.name}" in proc.stdout
    summary = cli_json("extract", *extract_args, "--repair")
    assert [d["part"] for d in summary["repaired"]["dropped_parts"]] == [big.name]
    assert summary["new"] == big.rows - big.deleted and summary["rows"] == len(ref)
    after = load_cache(out)
    assert list(after.paths) == list(ref.paths)
    np.testing.assert_allclose(after.embeddings, ref.embeddings, rtol=1e-5, atol=1e-6)  # re-extracted, same numbers
    assert cli_json("verify", str(out))["ok"]


def test_a_damaged_manifest_is_exit_5_and_repair_rebuilds_it_from_the_parts(cache):
    out, extract_args = cache
    ref = load_cache(out)
    _flip(out, out.stat().st_size // 2, 512)
    for args in (("status", str(out)), ("fit-head", str(out), "--clf", "logreg")):
        proc = run_cli(*args)
        assert proc.returncode == 5, (args, proc.stderr)
        _one_error(proc, str(out), "--repair")
    summary = cli_json("extract", *extract_args, "--repair")
    assert summary["repaired"]["rebuilt_manifest"] and summary["new"] == 0  # nothing lost: every row came back from its part
    after = load_cache(out)
    assert list(after.paths) == list(ref.paths) and np.array_equal(after.embeddings, ref.embeddings)


def test_a_schema_1_cache_is_read_by_every_command_then_migrated(tmp_path, cache):
    out, extract_args = cache
    ref = load_cache(out)
    old = tmp_path / "old.h5"
    # the same rows, as the previous release stored them (without the racy rule's scan time: with it, files
    # written less than 2 s before the fixture's extract would be hashed, and rows without a SHA-256 count as changed)
    v1 = Schema1Writer(old, {k: v for k, v in ref.meta.items() if k != "scan_started"})
    v1.add(list(ref.paths), ref.embeddings, labels=ref.labels.tolist(), split=list(ref.split), size=ref.fingerprints["size"].tolist(),
           mtime_ns=ref.fingerprints["mtime_ns"].tolist())
    v1.commit()
    status = cli_json("status", str(old))
    assert status["schema_version"] == 1 and status["rows"] == len(ref) and status["not_extracted"] == 0
    head = tmp_path / "h.pt"
    fit = cli_json("fit-head", str(old), "--clf", "logreg", "--out", str(head))
    assert cli_json("evaluate", str(head), "--cache", str(old))["val"]["accuracy"] == fit["metrics"]["val"]["accuracy"]
    assert cli_json("verify", str(old))["schema_version"] == 1
    summary = cli_json("extract", *extract_args[:-1], str(old))  # the next extract migrates it; nothing to re-extract
    assert summary["new"] == 0 and summary["cached"] == len(ref)
    assert cli_json("status", str(old))["schema_version"] == 2 and cli_json("verify", str(old))["ok"]
    after = load_cache(old)
    assert list(after.paths) == list(ref.paths) and np.array_equal(after.embeddings, ref.embeddings)
    assert json.loads(run_cli("status", str(head), "--json").stdout)["stale"] is False  # the head's record of its cache survived


def test_a_cache_moved_without_its_parts_is_named(tmp_path, cache):
    out, _ = cache
    moved = tmp_path / "moved.h5"
    shutil.copy(out, moved)
    proc = run_cli("fit-head", str(moved), "--clf", "logreg")
    assert proc.returncode == 5
    _one_error(proc, "missing", ".parts folder")


def test_status_of_a_cache_written_by_other_code(tmp_path):
    """The README's CacheWriter recipe records no preprocessing and no data folder: status says so, and scans nothing."""
    from pipeline.store import CacheWriter, PendingRow, new_cache_meta

    w = CacheWriter(tmp_path / "own.h5", new_cache_meta("my-model", 4, ["a", "b"]))
    w.add([PendingRow("x.png", 0, "train", 1, 1, "ab" * 32)], np.ones((1, 4), np.float32))
    w.commit()
    w.close()
    p = run_cli("status", str(tmp_path / "own.h5"))
    assert p.returncode == 0, p.stderr
    assert "preprocess (not recorded)" in p.stdout and "pending" not in p.stdout
