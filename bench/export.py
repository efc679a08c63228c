"""Export throughput: ``featcache export`` (streamed from the cache, bounded memory) beside
writing the same arrays with plain pyarrow / numpy, measured side by side in one run.

    python bench/export.py                  # 500,000 rows x 256 float32 (512 MB of embeddings), best of 2
    python bench/export.py --quick          # 20,000 x 64 (CI: the script runs and the numbers are sane)
    python bench/export.py --rows 1000000 --dim 768 --repeat 3 --json

A synthetic cache is written once through ``CacheWriter`` (paths in storage order, as
``extract`` writes a folder). Then, each in a fresh process and interleaved ``--repeat``
times (the best run of each counts: this machine's disk and CPUs are shared):

* **ours parquet**: ``export_cache(cache, dir, "parquet")`` — reads the cache's rows and
  streams their embeddings chunk by chunk into ``embeddings.parquet`` (snappy, one row group
  per chunk, fsync, rename);
* **plain pyarrow**: the arrays already in memory (``load_cache``, not timed), then
  ``pa.table`` + ``pq.write_table`` of the same columns with the same row groups and column
  options (no fsync: what a script does);
* **plain pyarrow, defaults**: the same table with ``pq.write_table``'s defaults (row groups
  of 1 Mi rows, dictionary and statistics on every column), for information;
* **plain pyarrow + fsync**: as plain pyarrow, then the file fsynced — the same durability as
  ours (a crash right after it returns cannot lose the file): the reference of the goal;
* **ours npy** and **plain numpy** (``np.save`` + ``pq.write_table`` of the metadata).

Reported: seconds, MB/s of embeddings (10^6 bytes), peak RSS of the process (``wait4``), and
ours / plain for each layout (goal: >= 0.8).
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "bench"))

from common import run_json  # noqa: E402

CLASSES = 100


def worker_build(path: str, rows: int, dim: int) -> dict:
    import numpy as np

    from pipeline.store import CacheWriter, new_cache_meta

    meta = new_cache_meta("synthetic", dim, [f"c{i:03d}" for i in range(CLASSES)], layout="imagefolder", data_root="/data")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    step = max(1, (64 << 20) // (dim * 4))
    with CacheWriter.open(path, meta) as w:
        for start in range(0, rows, step):
            ids = np.arange(start, min(rows, start + step))
            cls = ids * CLASSES // rows
            paths = np.char.add(np.char.add(np.char.mod("c%03d/", cls), np.char.mod("%09d", ids)), ".jpg").astype("S")
            split = np.where(ids % 5 == 0, 2, 1).astype(np.uint8)  # val, train
            w.add_columns(paths, rng.standard_normal((len(ids), dim), dtype=np.float32), labels=cls, split=split)
            w.commit()
    return {"seconds": round(time.perf_counter() - t0, 2)}


def worker_ours(path: str, out: str, fmt: str) -> dict:
    from pipeline.exchange import export_cache

    s = export_cache(path, out, fmt)
    return {"seconds": s.seconds, "mb": s.embedding_bytes / 1e6, "bytes_written": s.bytes_written, "row_groups": s.row_groups}


def _plain_table(c):
    import numpy as np
    import pyarrow as pa

    n, dim = c.embeddings.shape
    classes = np.array(c.classes, dtype=object)
    return pa.table({"path": pa.array(c.paths, pa.string()), "label": pa.array(c.labels.astype(np.int32)),
                     "class": pa.array(classes[c.labels], pa.string(), mask=c.labels < 0), "split": pa.array(c.split, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(c.embeddings.reshape(-1)), dim)})


def worker_plain(path: str, out: str, fmt: str, settings: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline import load_cache
    from pipeline.exchange.export import CHUNK_BYTES, MAX_ROW_GROUP_ROWS

    c = load_cache(path)  # the arrays in memory: not timed
    n, dim = c.embeddings.shape
    group = max(1, min(MAX_ROW_GROUP_ROWS, CHUNK_BYTES // (dim * c.embeddings.itemsize)))
    same = {"row_group_size": group, "compression": "snappy", "use_dictionary": ["class", "split"], "write_statistics": ["path", "label", "class", "split"]}
    Path(out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = _plain_table(c)
    if fmt == "parquet":
        pq.write_table(table, f"{out}/embeddings.parquet", **(same if settings in ("same", "durable") else {}))
        if settings == "durable":  # on disk before it counts as written, as ours (fsync, then rename)
            fd = os.open(f"{out}/embeddings.parquet", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    else:
        np.save(f"{out}/embeddings.npy", c.embeddings)
        pq.write_table(table.drop_columns(["embedding"]), f"{out}/metadata.parquet", **same)
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in Path(out).iterdir())
    return {"seconds": seconds, "mb": c.embeddings.nbytes / 1e6, "bytes_written": written}


METHODS = [  # (name, worker, format, settings)
    ("ours parquet", "ours", "parquet", ""),
    ("plain pyarrow", "plain", "parquet", "same"),
    ("plain pyarrow, defaults", "plain", "parquet", "defaults"),
    ("plain pyarrow + fsync", "plain", "parquet", "durable"),
    ("ours npy", "ours", "npy", ""),
    ("plain numpy", "plain", "npy", "same"),
]


def _worker(*args: str):
    return run_json([sys.executable, __file__, "--worker", *args], cwd=ROOT)


def measure(work: Path, rows: int, dim: int, repeat: int, log) -> dict:
    cache = work / "bench.h5"
    built, _ = _worker("build", str(cache), str(rows), str(dim))
    log(f"cache: {rows:,} rows x {dim} float32 ({rows * dim * 4 / 1e6:,.0f} MB of embeddings) written in {built['seconds']} s")
    runs: dict[str, list[dict]] = {name: [] for name, *_ in METHODS}
    for r in range(repeat):
        for name, kind, fmt, settings in METHODS:
            out = work / f"out-{kind}-{fmt}-{settings}"
            args = (str(cache), str(out), fmt) + ((settings,) if kind == "plain" else ())
            res, usage = _worker(kind, *args)
            res["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
            res["mb_per_s"] = round(res["mb"] / res["seconds"], 1)
            runs[name].append(res)
            log(f"  run {r + 1}/{repeat} {name:<24} {res['seconds']:6.2f} s {res['mb_per_s']:8.1f} MB/s  peak RSS {res['peak_rss_mib']:7.1f} MiB")
            shutil.rmtree(out, ignore_errors=True)
    best = {name: max(rs, key=lambda x: x["mb_per_s"]) for name, rs in runs.items()}
    results = {name: {**b, "median_mb_per_s": round(statistics.median(x["mb_per_s"] for x in runs[name]), 1),
                      "all_mb_per_s": [x["mb_per_s"] for x in runs[name]]} for name, b in best.items()}
    ratios = {"parquet_ours_over_plain": round(best["ours parquet"]["mb_per_s"] / best["plain pyarrow"]["mb_per_s"], 2),
              "parquet_ours_over_plain_defaults": round(best["ours parquet"]["mb_per_s"] / best["plain pyarrow, defaults"]["mb_per_s"], 2),
              "parquet_ours_over_plain_fsync": round(best["ours parquet"]["mb_per_s"] / best["plain pyarrow + fsync"]["mb_per_s"], 2),
              "npy_ours_over_plain": round(best["ours npy"]["mb_per_s"] / best["plain numpy"]["mb_per_s"], 2)}
    return {"rows": rows, "dim": dim, "dtype": "float32", "repeat": repeat, "cache_build_seconds": built["seconds"], "results": results, "ratios": ratios,
            "cpu_count": os.cpu_count()}


def table(result: dict) -> str:
    lines = [f"{result['rows']:,} rows x {result['dim']} float32 = {result['rows'] * result['dim'] * 4 / 1e6:,.0f} MB of embeddings; "
             f"best of {result['repeat']} (median in brackets); {result['cpu_count']} CPUs",
             f"{'method':<26} {'seconds':>8} {'MB/s':>16} {'peak RSS':>12} {'file MB':>9}"]
    for name, r in result["results"].items():
        lines.append(f"{name:<26} {r['seconds']:8.2f} {r['mb_per_s']:7.1f} ({r['median_mb_per_s']:6.1f}) {r['peak_rss_mib']:8.0f} MiB {r['bytes_written'] / 1e6:9.0f}")
    ra = result["ratios"]
    lines.append(f"ours / plain pyarrow + fsync (same settings, same durability): {ra['parquet_ours_over_plain_fsync']:.2f}  (goal >= 0.8)")
    lines.append(f"ours / plain pyarrow (same file settings, no fsync): {ra['parquet_ours_over_plain']:.2f}   "
                 f"ours / plain pyarrow defaults: {ra['parquet_ours_over_plain_defaults']:.2f}   ours npy / plain numpy: {ra['npy_ours_over_plain']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--rows", type=int, default=None, help="rows in the cache (default 500000; --quick 20000)")
    parser.add_argument("--dim", type=int, default=None, help="embedding width (default 256; --quick 64)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved runs of each method; the best counts (default 2; --quick 1)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one; needs ~3x the embeddings' size free)")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"build": lambda p, r, d: worker_build(p, int(r), int(d)), "ours": worker_ours, "plain": worker_plain}[kind]
        print(json.dumps(fn(*rest)))
        return
    rows = args.rows or (20_000 if args.quick else 500_000)
    dim = args.dim or (64 if args.quick else 256)
    repeat = args.repeat or (1 if args.quick else 2)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    work = Path(args.dir or tempfile.mkdtemp(prefix="featcache-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(work, rows, dim, repeat, log)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
