"""The store against real processes: writers killed (SIGKILL) during commits and during tiered
merges, readers racing a compacting writer, and compaction's memory measured in a fresh
process at two cache sizes."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.store import CacheWriter, CompactionPolicy, WriterLock, iter_embeddings, new_cache_meta, parts_dir_for, read_rows, verify_cache
from pipeline.store.manifest import read_manifest

from conftest import ROOT

pytestmark = pytest.mark.slow
DIM = 16
META = new_cache_meta("synthetic", DIM, ["a"])
META256 = new_cache_meta("synthetic", 256, ["a"])

# A writer that commits deterministic rows and says what it is doing on stdout: "commit C"
# once commit C is durable, "merge" when a merge starts, "part" when a part file is being written.
WRITER = textwrap.dedent("""
    import sys, numpy as np
    import pipeline.store.maintenance as mm
    import pipeline.store.writer as wm
    from pipeline.store import CacheWriter, CompactionPolicy, WriterLock, new_cache_meta
    path, first, last, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    say = lambda text: (sys.stdout.write(text + "\\n"), sys.stdout.flush())
    real_merge, real_part = mm.merge, wm.write_part
    mm.merge = lambda w, names: (say("merge"), real_merge(w, names))[1]
    wm.write_part = lambda *a, **k: (say("part"), real_part(*a, **k))[1]
    with WriterLock(path):
        w = CacheWriter(path, new_cache_meta("synthetic", %(dim)d, ["a"]), policy=CompactionPolicy(fanout=2, memory_budget=64 << 10))
        for c in range(first, last):
            names = [f"a/{c}-{j}" for j in range(per)] + ["a/hot"]
            emb = np.zeros((per + 1, %(dim)d), np.float32)
            emb[:per, 0], emb[:, 1] = np.arange(per), c
            w.add_columns(names, emb, labels=[0] * (per + 1), size=[c] * (per + 1))
            w.commit()
            say(f"commit {c}")
        w.close()
""" % {"dim": DIM})


def _start_writer(path: Path, first: int, last: int, per: int = 300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(first), str(last), str(per)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_cache(path: Path, reported: int, per: int = 300) -> int:
    """Every row of commits 0..k present exactly once with its own numbers, k the last durable
    commit: at least the last one the writer reported (it may have got further before the kill
    than the pipe showed); returns k, or -1 when the kill came before the first commit (then
    there must be no cache at all: nothing half-made that a reader could open)."""
    with WriterLock(path):
        CacheWriter(path, META)  # the next writer: adopts or deletes what the killed one left
    if not path.exists():
        assert reported == -1, f"commit {reported} was reported durable but there is no cache"
        assert not [p for p in path.parent.rglob("*") if ".tmp-" in p.name]
        return -1
    c = load_cache(path)
    assert len(set(c.paths.tolist())) == len(c), "a path is listed twice"
    hot = int(c.embeddings[list(c.paths).index("a/hot"), 1]) if "a/hot" in c.paths else -1
    assert hot >= reported, (hot, reported)
    assert len(c) == (hot + 1) * per + 1
    for p, e, size in zip(c.paths.tolist(), c.embeddings, c.fingerprints["size"]):
        if p != "a/hot":
            commit, j = map(int, p[2:].split("-"))
            assert (e[0], e[1], size) == (j, commit, commit), p
    assert verify_cache(path).ok
    assert not [p for p in path.parent.rglob("*") if ".tmp-" in p.name]
    return hot


@pytest.mark.parametrize("moment", ["part", "merge", pytest.param("merge", id="merge-again"), "random", "first-part"])
def test_a_writer_killed_mid_commit_or_mid_merge_loses_nothing_committed(tmp_path, moment):
    """``first-part``: killed while writing the very first part, before any manifest exists."""
    path = tmp_path / "c.h5"
    rng = random.Random(hash(moment) % 1000 + len(str(tmp_path)))
    proc = _start_writer(path, 0, 400)
    reported, seen, target = -1, 0, rng.randint(3, 12)
    if moment == "first-part":
        moment, target = "part", 1
    deadline = time.monotonic() + 120
    start = time.monotonic()
    delay = rng.uniform(0.3, 2.5)
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("commit"):
            reported = int(line.split()[1])
        if (moment != "random" and line == moment and (seen := seen + 1) >= target) or (moment == "random" and time.monotonic() - start > delay):
            time.sleep(0 if target == 1 else rng.uniform(0, 0.02))
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    done = _check_cache(path, reported)
    rest = _start_writer(path, done + 1, done + 6)  # the next run carries on from there
    assert rest.wait() == 0, rest.stderr.read()
    assert _check_cache(path, done + 5) == done + 5


READER_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pipeline.store import CacheWriter, CompactionPolicy, WriterLock, new_cache_meta
    path, versions = sys.argv[1], int(sys.argv[2])
    with WriterLock(path):
        w = CacheWriter(path, new_cache_meta("synthetic", %(dim)d, ["a"]), policy=CompactionPolicy(fanout=3))
        for v in range(1, versions + 1):
            for half in (0, 1):  # every version rewrites every path, in two commits
                ids = np.arange(half * 500, (half + 1) * 500)
                emb = np.zeros((500, %(dim)d), np.float32)
                emb[:, 0], emb[:, 1] = ids, v
                w.add_columns([f"a/{i}" for i in ids], emb, labels=[0] * 500, size=[v] * 500)
                w.commit()
            if v %% 3 == 0:
                w.compact(full=True)
        w.close()
""" % {"dim": DIM})


def test_readers_see_one_version_while_another_process_compacts(tmp_path):
    """Each row a reader gets is that row's own (its embedding carries its path id and the
    version its metadata says), whatever the writer commits or compacts meanwhile."""
    path = tmp_path / "c.h5"
    seed = subprocess.run([sys.executable, "-c", READER_WRITER, str(path), "1"], cwd=ROOT, capture_output=True, text=True)
    assert seed.returncode == 0, seed.stderr
    proc = subprocess.Popen([sys.executable, "-c", READER_WRITER, str(path), "40"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    reads = 0
    while proc.poll() is None or reads < 5:
        with read_rows(path) as table:
            time.sleep(0.02)  # let the writer move on: this table's rows must stay as they were
            ids = np.array([int(p[2:]) for p in table.paths.tolist()])
            for pos, block in iter_embeddings(table, table.index_rows, chunk_rows=97):
                np.testing.assert_array_equal(block[:, 0], ids[pos])
                np.testing.assert_array_equal(block[:, 1], table.fingerprints["size"][pos])
        c = load_cache(path)
        np.testing.assert_array_equal(c.embeddings[:, 1], c.fingerprints["size"])
        reads += 1
    assert proc.returncode == 0, proc.stderr.read()
    assert reads >= 5 and len(load_cache(path)) == 1000
    time.sleep(0.1)
    with WriterLock(path):
        CacheWriter(path, META)  # no reader now: every retired part goes
    parts = {p.name for p in parts_dir_for(path).glob("part-*.h5")}
    assert parts == set(read_manifest(path).names())


MEASURE = textwrap.dedent("""
    import resource, sys, json
    from pipeline.store import CacheWriter, CompactionPolicy, WriterLock, new_cache_meta
    path = sys.argv[1]
    with WriterLock(path):
        w = CacheWriter(path, new_cache_meta("synthetic", 256, ["a"]), policy=CompactionPolicy(auto=False, memory_budget=4 << 20))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        w.compact(full=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kib": after - before, "parts": len(w.manifest.parts)}))
""")


def _build(path: Path, rows: int) -> None:
    w = CacheWriter(path, META256, policy=CompactionPolicy(auto=False))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 5000):
        n = min(5000, rows - start)
        w.add_columns([f"a/{i}" for i in range(start, start + n)], rng.standard_normal((n, 256), dtype=np.float32), labels=[0] * n)
        w.commit()


def test_compaction_memory_does_not_grow_with_the_cache(tmp_path):
    """A full compaction of 20 MB and of 80 MB of embeddings, each in a fresh process: its peak
    memory above what the process held before stays within the merge budget (4 MiB here)
    plus a fixed overhead, and does not grow with the cache."""
    grew = {}
    for rows in (20_000, 80_000):
        path = tmp_path / f"c{rows}.h5"
        _build(path, rows)
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["parts"] == 1
        grew[rows] = out["grew_kib"] / 1024
        assert len(load_cache(path)) == rows
    assert grew[80_000] < 48, grew  # loading the cache would take 80 MB more
    assert grew[80_000] - grew[20_000] < 12, grew


def test_a_killed_reader_leaves_no_lease_that_blocks_deletion(tmp_path):
    path = tmp_path / "c.h5"
    _build(path, 10_000)
    code = f"from pipeline.store import read_rows; t = read_rows({str(path)!r}); print('reading', flush=True); import time; time.sleep(60)"
    reader = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "reading"
    with WriterLock(path):
        w = CacheWriter(path, META256)
        w.compact(full=True)
        retired = [n for n, _ in w.manifest.garbage]
        assert retired and all((parts_dir_for(path) / n).exists() for n in retired)  # the live reader holds them
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    with WriterLock(path):
        CacheWriter(path, META256)
    assert not any((parts_dir_for(path) / n).exists() for n in retired)

