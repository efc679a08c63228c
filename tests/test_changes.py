"""Content changes the size+mtime check cannot see (issue #28, item 6): a rewrite whose mtime
was restored (``touch -r``) is found by ``--verify-content``; a rewrite within the mtime
granularity right after a file was hashed (git's "racy" entries) is hashed again by the next
run by default; and a run with nothing to do neither loads the backbone nor reads a file."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import pipeline.extract
import pipeline.images.reader
from pipeline import load_cache
from pipeline.errors import IncompatibleError
from pipeline.extract import run_extract

from conftest import make_image

HOUR_AGO = time.time_ns() - 3600 * 10**9


def _old(path):
    """An mtime well before any run (a collection that was not just written)."""
    os.utime(path, ns=(HOUR_AGO, HOUR_AGO))
    return path


def _rewrite_keeping_stat(path, seed: int) -> None:
    """New pixels, same size (BMP: size follows the dimensions), mtime put back as ``touch -r`` does."""
    st = path.stat()
    make_image(path, seed=seed, fmt="BMP")
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def bmp_tree(tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            _old(make_image(root / cls / f"{i}.bmp", seed=10 * c + i, fmt="BMP"))
    return root


def _row(cache_path, relpath):
    c = load_cache(cache_path)
    i = list(c.paths).index(relpath)
    return c.embeddings[i], bytes(c.fingerprints["sha256"][i])


def test_touch_r_is_seen_by_verify_content_which_also_retries_failures(tmp_path, bmp_tree):
    out = tmp_path / "c.h5"
    bad = bmp_tree / "dog" / "bad.png"
    bad.write_bytes(b"not an image")
    _old(bad)
    first = run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    assert (first.new, first.failed) == (6, 1)
    before, old_sha = _row(out, "cat/1.bmp")
    untouched, _ = _row(out, "dog/2.bmp")

    _rewrite_keeping_stat(bmp_tree / "cat" / "1.bmp", seed=99)
    quick = run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    assert (quick.new, quick.new_failed) == (0, 0)  # the default check is size + mtime, as rsync's: documented

    paranoid = run_extract(bmp_tree, "resnet18", "none", out, workers=0, verify_content=True)
    assert paranoid.new == 1
    assert (quick.hashed, paranoid.hashed, paranoid.content_changed) == (0, 6, 1)
    assert paranoid.new_failed == 1 and paranoid.failed == 1  # the recorded failure was tried again
    after, new_sha = _row(out, "cat/1.bmp")
    assert not np.allclose(before, after) and new_sha != old_sha  # the old row was replaced, not kept
    np.testing.assert_array_equal(untouched, _row(out, "dog/2.bmp")[0])
    fresh = run_extract(bmp_tree, "resnet18", "none", tmp_path / "fresh.h5", workers=0)
    assert fresh.new == 6
    np.testing.assert_allclose(after, _row(tmp_path / "fresh.h5", "cat/1.bmp")[0], rtol=1e-4, atol=1e-5)
    assert len(load_cache(out)) == 6

    settled = run_extract(bmp_tree, "resnet18", "none", out, workers=0, verify_content=True)
    assert (settled.new, settled.hashed, settled.content_changed) == (0, 6, 0)


def test_a_rewrite_right_after_hashing_is_hashed_again_by_the_next_run(tmp_path, bmp_tree):
    """A file written just before the run (its mtime within 2 s of the scan) and rewritten with
    the same size and mtime afterwards (FAT or ext3 keep whole seconds) is caught by default."""
    out = tmp_path / "c.h5"
    fresh = bmp_tree / "cat" / "0.bmp"
    now = time.time_ns()  # within RACY_SECONDS of the scan that follows
    os.utime(fresh, ns=(now, now))
    run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    before, _ = _row(out, "cat/0.bmp")

    _rewrite_keeping_stat(fresh, seed=1234)
    second = run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    assert (second.new, second.cached) == (1, 5)
    assert (second.hashed, second.content_changed) == (1, 1)  # only the racy file was read
    assert not np.allclose(before, _row(out, "cat/0.bmp")[0])


def test_a_run_with_nothing_to_extract_loads_no_backbone_and_reads_no_file(tmp_path, bmp_tree, monkeypatch):
    out = tmp_path / "c.h5"
    run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    monkeypatch.setattr(pipeline.extract, "load_backbone", lambda *a, **k: pytest.fail("a no-op run loaded the backbone"))
    monkeypatch.setattr(pipeline.images.reader, "_digest", lambda *a, **k: pytest.fail("a no-op run hashed a file"), raising=False)
    noop = run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    assert (noop.new, noop.cached, noop.hashed, noop.commits) == (0, 6, 0, 0)
    assert (noop.weights, noop.embed_dim, noop.rows) == ("none", 512, 6)

    (bmp_tree / "dog" / "2.bmp").unlink()  # only a file to drop: still no backbone
    dropped = run_extract(bmp_tree, "resnet18", "none", out, workers=0)
    assert (dropped.removed, dropped.rows) == (1, 5)

    monkeypatch.undo()
    _old(make_image(bmp_tree / "dog" / "9.bmp", seed=9, fmt="BMP"))
    added = run_extract(bmp_tree, "resnet18", "none", out, workers=0)  # a file to extract: the backbone is loaded and checked
    assert (added.new, added.rows) == (1, 6)
    with pytest.raises(IncompatibleError):
        run_extract(bmp_tree, "resnet18", "none", out, workers=0, seed=3)  # another backbone is still refused


def test_content_digests_are_the_decoders_hashes_in_threads_or_not(tmp_path):
    """What the content check compares: the SHA-256 the reader records for a file, a tar
    member (read in place) or nothing (a file gone since the scan), with and without threads."""
    import hashlib
    import io
    import tarfile

    from pipeline.images import ImageRecord, content_digests

    blobs = [bytes([i]) * (3000 + i) for i in range(40)]
    for i, b in enumerate(blobs):
        (tmp_path / f"{i}.png").write_bytes(b)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, b in enumerate(blobs[:5]):
            info = tarfile.TarInfo(f"m{i}.png")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = [ImageRecord(f"s.tar/{m.name}", -1, "", m.size, 0, "s.tar", m.offset_data) for m in tar.getmembers()]
    records = [ImageRecord(f"{i}.png", -1, "", len(b), 0) for i, b in enumerate(blobs)] + members + [ImageRecord("gone.png", -1, "", 1, 0)]
    expected = [hashlib.sha256(b).digest() for b in blobs + blobs[:5]] + [None]
    assert content_digests(tmp_path, records, threads=1) == expected
    assert content_digests(tmp_path, records, threads=3, chunk=7) == expected
