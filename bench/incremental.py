"""What the incremental check costs: a no-op `extract` over N unchanged files with the default
check (size + mtime, as rsync) and with `--verify-content` (every file read and hashed),
side by side in one run on this machine.

    python bench/incremental.py                 # 200,000 files of 16 KiB
    python bench/incremental.py --quick         # 3,000 files (CI: the script runs and the numbers are sane)
    python bench/incremental.py --json          # one JSON object instead of the table

The cache is built cheaply, without a backbone: a folder of N small files (random bytes with
an image extension: a no-op run never decodes them) with mtimes an hour old, and a resnet18
cache (--weights none, float16) whose rows are written directly through ``CacheWriter`` with
each file's relpath, label, size, mtime and real SHA-256, and the provenance `extract` records
(including when its last run began scanning), so the timed runs have nothing to extract.

Timed, in this process (interpreter start and imports excluded; ``bench/cache_scale.py``
measures a no-op from the command line), the median of --repeat runs each:
  default   the size + mtime check; the run must load no backbone and hash no file;
  verify    --verify-content with the files in the page cache (just written);
  cold      --verify-content after every file's pages were evicted (posix_fadvise DONTNEED:
            the bytes come from the disk), once;
  hashing alone over the same files with 1 thread and with one thread per core (extract
  uses the pool only for files of 64 KiB or more on average: ``images.reader.hash_threads``).
Ratios are computed from this one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import pipeline.extract as extract  # noqa: E402
from pipeline.changes import SCAN_STARTED  # noqa: E402
from pipeline.devices import resolve_device  # noqa: E402
from pipeline.images import content_digests, scan_folder  # noqa: E402
from pipeline.images.reader import hash_threads  # noqa: E402
from pipeline.store import CacheWriter, WriterLock  # noqa: E402

MODEL, WEIGHTS, DTYPE = "resnet18", "none", "float16"
CLASSES = 100
CORES = len(os.sched_getaffinity(0))


def make_files(root: Path, n: int, size: int) -> None:
    """``n`` distinct files of ``size`` bytes under ``CLASSES`` class folders, their mtimes an hour old."""
    blob = np.random.default_rng(0).bytes(size)
    old = time.time_ns() - 3600 * 10**9
    for c in range(min(CLASSES, n)):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"c{i % CLASSES:03d}" / f"{i:07d}.png"
        path.write_bytes(i.to_bytes(8, "little") + blob[8:])
        os.utime(path, ns=(old, old))


def make_cache(root: Path, cache: Path) -> int:
    """The cache `extract` would have written for this folder, rows written directly (zero
    embeddings: a no-op run never reads them); returns the rows written."""
    scan = scan_folder(root)
    backbone = extract.load_backbone(MODEL, WEIGHTS)
    meta = {**extract.build_meta(backbone, scan, DTYPE, resolve_device("cpu")), SCAN_STARTED: time.time()}
    recs = scan.records
    with WriterLock(cache):
        writer = CacheWriter(cache, meta)
        for start in range(0, len(recs), 50_000):
            chunk = recs[start : start + 50_000]
            sha = np.frombuffer(b"".join(hashlib.sha256((root / r.relpath).read_bytes()).digest() for r in chunk), np.uint8).reshape(-1, 32)
            writer.add_columns([r.relpath for r in chunk], np.zeros((len(chunk), backbone.embed_dim), np.float16), labels=[r.label for r in chunk],
                               size=[r.size for r in chunk], mtime_ns=[r.mtime_ns for r in chunk], sha256=sha)
            writer.commit()
        writer.close()
    return len(recs)


def evict(root: Path) -> None:
    """Drop every file's pages from the page cache (allowed without privileges for files one can open)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_extract(root: Path, cache: Path, verify: bool, loads: list) -> dict:
    """One no-op extract; its seconds, what it hashed, and how many backbones it loaded."""
    before = len(loads)
    t0 = time.perf_counter()
    s = extract.run_extract(root, MODEL, WEIGHTS, cache, dtype=DTYPE, device="cpu", workers=0, verify_content=verify)
    seconds = time.perf_counter() - t0
    if s.new or s.removed or s.content_changed:
        raise SystemExit(f"the timed run was not a no-op: new {s.new}, removed {s.removed}, content changed {s.content_changed}")
    return {"seconds": seconds, "hashed": s.hashed, "backbones_loaded": len(loads) - before, "cached": s.cached}


def timed_hash(root: Path, threads: int | None) -> float:
    recs = scan_folder(root).records
    t0 = time.perf_counter()
    digests = content_digests(root, recs, threads=threads)
    seconds = time.perf_counter() - t0
    assert all(d is not None for d in digests)
    return seconds


def median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    out["seconds"] = round(statistics.median(r["seconds"] for r in runs), 3)
    return out


def measure(work: Path, files: int, size: int, repeat: int, log) -> dict:
    root, cache = work / "files", work / "cache.h5"
    t0 = time.perf_counter()
    make_files(root, files, size)
    rows = make_cache(root, cache)
    log(f"setup: {files:,} files of {size:,} bytes and a cache of {rows:,} rows in {time.perf_counter() - t0:.1f} s")
    loads: list = []
    real_load = extract.load_backbone
    extract.load_backbone = lambda *a, **k: loads.append(1) or real_load(*a, **k)  # counts the loads of the timed runs
    try:
        default, verify = [], []
        for _ in range(repeat):
            default.append(timed_extract(root, cache, False, loads))
            verify.append(timed_extract(root, cache, True, loads))
        evict(root)
        cold = timed_extract(root, cache, True, loads)
    finally:
        extract.load_backbone = real_load
    result = {"files": files, "file_bytes": size, "repeat": repeat, "cpu_count": os.cpu_count(),
              "default": median(default), "verify": median(verify), "verify_cold": {**cold, "seconds": round(cold["seconds"], 3)},
              "hash_1_thread_seconds": round(timed_hash(root, 1), 3), "pool_threads": CORES, "hash_pool_seconds": round(timed_hash(root, CORES), 3),
              "threads_extract_uses": hash_threads(scan_folder(root).records)}
    if any(r["hashed"] or r["backbones_loaded"] for r in default):
        raise SystemExit(f"a default no-op run read files or loaded a backbone: {default}")
    d, v, c = result["default"]["seconds"], result["verify"]["seconds"], result["verify_cold"]["seconds"]
    result["ratios"] = {"verify_over_default": round(v / d, 1), "verify_cold_over_default": round(c / d, 1),
                        "hash_pool_over_1_thread": round(result["hash_pool_seconds"] / result["hash_1_thread_seconds"], 2)}
    return result


def table(r: dict) -> str:
    mib = r["files"] * r["file_bytes"] / 2**20
    rate = lambda s: f"{r['files'] / s:>10,.0f} files/s {mib / s:>8,.0f} MiB/s"  # noqa: E731
    lines = [f"no-op extract over {r['files']:,} unchanged files of {r['file_bytes']:,} bytes ({mib:,.0f} MiB), {MODEL} cache, "
             f"{r['cpu_count']} cores; median of {r['repeat']}:",
             f"  {'default: size + mtime':<34} {r['default']['seconds']:>8.3f} s  hashed {r['default']['hashed']:>9,}  "
             f"backbones loaded {r['default']['backbones_loaded']}",
             f"  {'--verify-content (page cache warm)':<34} {r['verify']['seconds']:>8.3f} s  hashed {r['verify']['hashed']:>9,}  {rate(r['verify']['seconds'])}",
             f"  {'--verify-content (evicted: disk)':<34} {r['verify_cold']['seconds']:>8.3f} s  hashed {r['verify_cold']['hashed']:>9,}  "
             f"{rate(r['verify_cold']['seconds'])}",
             f"  {'hashing alone, 1 thread':<34} {r['hash_1_thread_seconds']:>8.3f} s",
             f"  {'hashing alone, ' + str(r['pool_threads']) + ' threads':<34} {r['hash_pool_seconds']:>8.3f} s  "
             f"(extract uses {r['threads_extract_uses']} for these files)"]
    ratios = r["ratios"]
    lines.append(f"ratios: verify / default {ratios['verify_over_default']}x (warm), {ratios['verify_cold_over_default']}x (disk); "
                 f"hashing pool / 1 thread {ratios['hash_pool_over_1_thread']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=None, help="unchanged files (default 200000; --quick 3000)")
    parser.add_argument("--file-bytes", type=int, default=16 << 10, help="bytes per file (default 16 KiB: a small JPEG)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per mode (default 3; --quick 1)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = args.files or (3000 if args.quick else 200_000)
    repeat = args.repeat or (1 if args.quick else 3)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    work = Path(args.dir or tempfile.mkdtemp(prefix="featcache-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(work, files, args.file_bytes, repeat, log)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
