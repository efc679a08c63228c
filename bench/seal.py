"""What checking every byte before HDF5 parses it costs a cache's readers (issue #28).

    python bench/seal.py            # 10 M rows x 128 (5 GB of embeddings)
    python bench/seal.py --quick    # 200 k rows x 128 (CI: the script runs and the numbers are sane)

Builds one synthetic cache through ``CacheWriter`` (big commits, then one full compaction),
then in fresh processes, interleaved and repeated, with the files in the page cache:

* ``load_cache`` as shipped: each part's *frame* (what HDF5 parses: headers, attributes,
  chunk indexes) is hashed and compared with its seal before h5py opens it, data chunks are
  checked by Fletcher-32 as they are read;
* ``load_cache`` with the seal check switched off (what it cost before seals);
* the alternative the issue suggested: SHA-256 of every part file before opening it, then
  ``load_cache`` (what every open would cost if parts were checked whole);
* ``verify`` (every byte hashed: fsck), for scale.

Printed: median seconds of each and the ratios to the unchecked load, measured side by side
in this run on this machine (the order alternates between rounds), and the time spent in the
seal checks themselves inside the shipped load (the cost without the load's own noise).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("shipped", "unchecked", "whole-file", "verify")


def build(path: Path, rows: int, dim: int, commit_rows: int) -> None:
    import numpy as np

    from pipeline.store import CacheWriter, CompactionPolicy, new_cache_meta

    rng = np.random.default_rng(0)
    meta = new_cache_meta("synthetic", dim, [f"c{i:03d}" for i in range(100)], weights="none", seed=0)
    w = CacheWriter(path, meta, policy=CompactionPolicy(auto=False))
    for start in range(0, rows, commit_rows):
        n = min(commit_rows, rows - start)
        ids = np.arange(start, start + n)
        paths = np.char.add(np.char.add(np.char.mod("c%03d/", ids % 100), np.char.mod("%010d", ids)), ".jpg").astype("S")
        w.add_columns(paths, rng.standard_normal((n, dim), dtype=np.float32), labels=ids % 100,
                      sha256=rng.integers(0, 256, (n, 32), dtype=np.uint8))
        w.commit()
    w.compact(full=True)
    w.close()


def worker(path: str, mode: str) -> None:
    """One measurement in this fresh process; prints {"seconds", "rows"}."""
    import pipeline.store.parts as parts
    from pipeline import load_cache
    from pipeline.store import parts_dir_for, verify_cache
    from pipeline.store.h5files import file_sha256

    spent = [0.0]
    if mode == "shipped":  # time the seal checks themselves: the cost, free of the load's own noise
        check = parts.check_file

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return check(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t

        parts.check_file = timed
    t0 = time.perf_counter()
    if mode == "verify":
        report = verify_cache(path)
        assert report.ok
        rows = report.rows
    else:
        if mode == "unchecked":
            parts.check_file = lambda *a, **k: None
        if mode == "whole-file":
            for part in sorted(parts_dir_for(Path(path)).glob("part-*.h5")):
                file_sha256(part)
        rows = len(load_cache(path))
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": rows, "seal_seconds": spent[0]}))


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 k rows (CI)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(*a.worker)
    rows = a.rows or (200_000 if a.quick else 10_000_000)
    with tempfile.TemporaryDirectory(prefix="featcache-seal-") as tmp:
        path = Path(tmp) / "c.h5"
        t0 = time.perf_counter()
        build(path, rows, a.dim, commit_rows=min(rows, 250_000))
        size = sum(p.stat().st_size for p in Path(f"{path}.parts").glob("*.h5"))
        print(f"cache: {rows:,} rows x {a.dim} float32, {size / 1e9:.2f} GB in parts, built in {time.perf_counter() - t0:.0f} s")
        measure(path, "unchecked")  # warm the page cache
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        checks: list[float] = []
        for k in range(a.repeat):
            for mode in MODES if k % 2 == 0 else MODES[::-1]:  # alternate the order: page-cache and allocator effects cancel
                got = measure(path, mode)
                seconds[mode].append(got["seconds"])
                if mode == "shipped":
                    checks.append(got["seal_seconds"])
        base = statistics.median(seconds["unchecked"])
        print(f"{'read':<44} {'median s':>9} {'x unchecked':>12}")
        labels = {"shipped": "load_cache, frame checked (shipped)", "unchecked": "load_cache, no seal check (before seals)",
                  "whole-file": "SHA-256 of every part file, then load_cache", "verify": "verify (every byte hashed)"}
        result = {}
        for mode in MODES:
            med = statistics.median(seconds[mode])
            result[mode] = {"seconds": round(med, 3), "ratio": round(med / base, 3)}
            print(f"{labels[mode]:<44} {med:>9.2f} {med / base:>12.2f}")
        check = statistics.median(checks)
        print(f"the seal checks themselves, inside the shipped load: {check * 1000:.1f} ms "
              f"({check / statistics.median(seconds['shipped']) * 100:.3f} % of it)")
        print(json.dumps({"rows": rows, "dim": a.dim, "bytes": size, **result, "seal_check_seconds": round(check, 5)}))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
