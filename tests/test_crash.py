"""Real processes: SIGKILL mid-run then resume; SIGTERM; two writers on one cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import load_cache
from pipeline.store.locks import lock_path_for

from conftest import ROOT, make_image, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def many_images(tmp_path) -> Path:
    root = tmp_path / "many"
    for i in range(48):
        make_image(root / ("a" if i % 2 else "b") / f"{i:03d}.jpg", size=(96, 80), seed=i)
    return root


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _generation(path: Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["generation"])
    except (OSError, KeyError):
        return 0


def _wait_for(cond, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


ARGS = ("-m", "resnet50", "-w", "none", "--batch-size", "4", "--commit-every", "4", "--workers", "0", "-q")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, many_images):
    out = tmp_path / "killed.h5"
    proc = _start("extract", str(many_images), *ARGS, "--out", str(out))
    assert _wait_for(lambda: _generation(out) >= 2), proc.stderr.read() if proc.poll() is not None else "no commit"
    assert proc.poll() is None, "the run finished before it could be killed; use more images"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = load_cache(out)  # committed rows survive the kill intact
    assert 8 <= len(partial) < 48

    resumed = run_cli("extract", str(many_images), *ARGS, "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["cached"] == len(partial) and summary["new"] == 48 - len(partial)

    ref = tmp_path / "clean.h5"
    assert run_cli("extract", str(many_images), *ARGS, "--out", str(ref)).returncode == 0
    a, b = load_cache(out), load_cache(ref)
    assert list(a.paths) == list(b.paths) and list(a.labels) == list(b.labels)
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-5)
    assert not any(".tmp-" in p.name for p in tmp_path.rglob("*"))


def test_sigterm_stops_cleanly_with_exit_130(tmp_path, many_images):
    out = tmp_path / "t.h5"
    proc = _start("extract", str(many_images), *ARGS, "--out", str(out))
    assert _wait_for(lambda: _generation(out) >= 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again" in err
    assert 4 <= len(load_cache(out)) < 48


def test_interrupt_commits_buffered_batches(tmp_path, many_images):
    """Ctrl-C between commits: finished batches still in the buffer are committed on the way
    out, and so is the batch whose forward had started (the runner starts batch k+1 before
    writing batch k): 3 batches reported + 1 in flight, each written once."""
    from pipeline.errors import Interrupted
    from pipeline.extract import run_extract

    calls = []

    def ctrl_c_after_three_batches(done, total, elapsed):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "i.h5"
    with pytest.raises(Interrupted, match="16 new images"):
        run_extract(many_images, "resnet18", "none", out, batch_size=4, workers=0, commit_every=1000, progress=ctrl_c_after_three_batches)
    cache = load_cache(out)
    assert len(cache) == 16 and len(set(cache.paths)) == 16


def _start_holding_lock(images: Path, out: Path) -> subprocess.Popen:
    """Start an extract and return once it holds the cache's writer lock."""
    proc = _start("extract", str(images), *ARGS, "--out", str(out))
    lock = lock_path_for(out)
    assert _wait_for(lambda: lock.exists() and lock.stat().st_size > 0)
    return proc


def test_second_writer_is_refused_then_waits(tmp_path, many_images):
    """The lock is held by this test process, so the outcome never depends on how fast a writer runs."""
    import threading

    from pipeline.store.locks import WriterLock

    out = tmp_path / "c.h5"
    lock = WriterLock(out, command="test holder").acquire()
    try:
        second = run_cli("extract", str(many_images), *ARGS, "--out", str(out))
        assert second.returncode == 4, second.stderr
        assert f"PID {os.getpid()}" in second.stderr and "--wait" in second.stderr
        assert not out.exists()  # refused before writing anything
        threading.Timer(2.0, lock.release).start()
        waited = run_cli("extract", str(many_images), *ARGS, "--out", str(out), "--wait", "300", "--json")
    finally:
        lock.release()
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["new"] == 48
    assert len(load_cache(out)) == 48


def test_lock_of_killed_writer_is_not_stale(tmp_path, many_images):
    out = tmp_path / "c.h5"
    proc = _start_holding_lock(many_images, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_cli("extract", str(many_images), *ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert len(load_cache(out)) == 48


def test_taking_a_lock_sweeps_temporaries_of_dead_writers_only(tmp_path):
    """A writer killed mid-write leaves `.NAME.tmp-PID-…` files; the next writer of that
    artifact removes them (its reports' too), but never a live process's."""
    from pipeline.store.locks import WriterLock

    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that no longer runs
    stale = [tmp_path / f".head.pt.tmp-{dead.pid}-0000aaaa", tmp_path / f".head.metrics.json.tmp-{dead.pid}-0000bbbb"]
    live = tmp_path / f".head.pt.tmp-{os.getpid()}-0000cccc"
    other = tmp_path / f".other.pt.tmp-{dead.pid}-0000dddd"  # another artifact's: its own writer sweeps it
    for p in [*stale, live, other]:
        p.write_bytes(b"partial")
    with WriterLock(tmp_path / "head.pt"):
        assert not (tmp_path / "head.pt.lock").exists() and (tmp_path / ".head.pt.lock").exists()  # the lock itself is hidden
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert not (tmp_path / ".head.pt.lock").exists()  # and gone once released: no empty lock files left beside artifacts


def test_a_waiter_whose_lock_file_was_deleted_on_release_locks_the_new_one(tmp_path):
    """Release deletes the lock file: a writer that opened the old file while it was held must
    not believe it holds the lock on the deleted inode while a third writer locks the new file."""
    import threading

    from pipeline.errors import LockHeldError
    from pipeline.store.locks import WriterLock

    target = tmp_path / "c.h5"
    first = WriterLock(target).acquire()
    got = threading.Event()
    waiter = WriterLock(target, wait=30)
    thread = threading.Thread(target=lambda: (waiter.acquire(), got.set()))
    thread.start()
    time.sleep(0.5)  # the waiter has opened the current lock file and polls it
    first.release()  # deletes that file, then unlocks it
    assert got.wait(10)
    with pytest.raises(LockHeldError):
        WriterLock(target).acquire()  # the new file at the path is the one the waiter holds
    waiter.release()
    thread.join()
    assert not (tmp_path / ".c.h5.lock").exists()
