"""A full disk is a clean exit 6: one line, nothing half-written, earlier work intact, and
never a crashed interpreter (HDF5 used to segfault after ENOSPC mid-write).

The disk is a real small filesystem (a tmpfs the test mounts; skipped where mounting is not
permitted), filled with ``fallocate`` to leave a chosen number of bytes. With the free-space
check switched off (``unchecked``), the writes really hit ENOSPC inside HDF5 and torch.save.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

UNCHECKED = "import pipeline.store.atomic as a; a.free_bytes = lambda folder: 1 << 62; "  # every free-space check passes


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs; ``fill(free)`` leaves about ``free`` bytes on it."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    filler = mount / "filler"

    def fill(free: int) -> None:
        filler.unlink(missing_ok=True)
        avail = shutil.disk_usage(mount).free
        if avail > free:
            subprocess.run(["fallocate", "-l", str(avail - free), str(filler)], check=True)

    def unfill() -> None:
        filler.unlink(missing_ok=True)

    try:
        yield mount, fill, unfill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _cli(args: list[str], unchecked: bool) -> subprocess.CompletedProcess:
    code = (UNCHECKED if unchecked else "") + f"import sys; sys.argv[0] = 'cli.py'; import cli; cli.main({args!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_clean_exit_6(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 6, (proc.returncode, proc.stderr[-2000:])  # not 1, never 139 (segfault)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("unchecked, free", [
    (False, 20_000), (False, 200_000),  # refused up front: below the headroom every write keeps
    (True, 4_000), (True, 12_000), (True, 24_000),  # ENOSPC inside HDF5: at the first part, a later part, the index
], ids=lambda v: "enospc-inside-hdf5" if v is True else "checked" if v is False else str(v))
def test_extract_onto_a_full_disk_exits_6_and_loses_nothing_committed(small_disk, digits_small, tiny_hub, free, unchecked):
    mount, fill, unfill = small_disk
    out = mount / "c.h5"
    fill(free)
    proc = _cli(["extract", str(digits_small), "-m", tiny_hub, "-w", "none", "--out", str(out), "--commit-every", "8", "--batch-size", "8"], unchecked)
    _assert_clean_exit_6(proc)
    unfill()
    again = run_cli("extract", str(digits_small), "-m", tiny_hub, "-w", "none", "--out", str(out), "--json")  # in this process: nothing to fake
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    n_images = sum(1 for p in Path(digits_small).rglob("*.png"))
    assert summary["rows"] == n_images and summary["failed"] == 0  # the next run completes what the full disk interrupted
    assert not [p for p in mount.rglob("*") if ".tmp-" in p.name]  # no temporaries left behind


@pytest.mark.parametrize("unchecked", [False, True], ids=["checked", "enospc-inside-torch-save"])
def test_fit_head_onto_a_full_disk_exits_6_and_keeps_the_previous_head(small_disk, digits_cache, unchecked):
    mount, fill, _ = small_disk
    head = mount / "h.pt"
    first = run_cli("fit-head", str(digits_cache), "--clf", "mlp", "--epochs", "2", "--out", str(head))
    assert first.returncode == 0, first.stderr
    before = head.read_bytes()
    fill(40_000)
    proc = _cli(["fit-head", str(digits_cache), "--clf", "mlp", "--epochs", "3", "--out", str(head)], unchecked)
    _assert_clean_exit_6(proc)
    assert head.read_bytes() == before  # the previous head is untouched
    assert not [p for p in mount.iterdir() if ".tmp-" in p.name]


def _synthetic_cache(path: Path, commits: int = 6, rows: int = 300):
    import numpy as np

    from pipeline.store import CacheWriter, CompactionPolicy, new_cache_meta

    w = CacheWriter(path, new_cache_meta("synthetic", 64, ["a"]), policy=CompactionPolicy(auto=False))
    rng = np.random.default_rng(0)
    for c in range(commits):
        w.add_columns([f"a/{c}-{i}" for i in range(rows)], rng.standard_normal((rows, 64), dtype=np.float32), labels=[0] * rows)
        w.commit()
    return w


@pytest.mark.parametrize("unchecked", [False, True], ids=["checked", "enospc-at-the-reservation"])
def test_a_merge_onto_a_full_disk_keeps_the_cache(small_disk, monkeypatch, unchecked):
    import numpy as np

    import pipeline.store.atomic as atomic
    from pipeline import load_cache
    from pipeline.errors import StorageError

    mount, fill, unfill = small_disk
    w = _synthetic_cache(mount / "c.h5")
    ref = load_cache(mount / "c.h5")
    fill(150_000)  # less than the merged copy needs
    if unchecked:
        monkeypatch.setattr(atomic, "free_bytes", lambda folder: 1 << 62)
    with pytest.raises(StorageError, match="disk is full"):
        w.compact(full=True)
    monkeypatch.undo()
    after = load_cache(mount / "c.h5")
    assert list(after.paths) == list(ref.paths) and np.array_equal(after.embeddings, ref.embeddings)
    assert not [p for p in mount.rglob("*") if ".tmp-" in p.name]
    unfill()
    assert w.compact(full=True) == 1 and len(w.manifest.parts) == 1  # the same writer carries on once there is room
    assert np.array_equal(load_cache(mount / "c.h5").embeddings, ref.embeddings)


def test_a_migration_onto_a_full_disk_leaves_the_schema_1_cache_as_it_was(small_disk):
    import h5py
    import numpy as np

    from pipeline import load_cache
    from pipeline.errors import StorageError
    from pipeline.store import CacheWriter, new_cache_meta

    from schema1 import Schema1Writer

    mount, fill, unfill = small_disk
    meta = new_cache_meta("synthetic", 64, ["a"])
    v1 = Schema1Writer(mount / "old.h5", meta)
    v1.add([f"a/{i}" for i in range(2000)], np.random.default_rng(0).standard_normal((2000, 64), dtype=np.float32), labels=[0] * 2000)
    v1.commit()
    ref = load_cache(mount / "old.h5")
    fill(200_000)  # the migration needs room for one copy (~0.6 MB)
    with pytest.raises(StorageError, match="disk is full"):
        CacheWriter(mount / "old.h5", meta)
    with h5py.File(mount / "old.h5") as f:
        assert f.attrs["schema_version"] == 1
    assert np.array_equal(load_cache(mount / "old.h5").embeddings, ref.embeddings)
    unfill()
    CacheWriter(mount / "old.h5", meta)
    with h5py.File(mount / "old.h5") as f:
        assert f.attrs["schema_version"] == 2
    assert np.array_equal(load_cache(mount / "old.h5").embeddings, ref.embeddings)
