"""The store at scale: commits, write amplification, compaction, reads and the nightly no-op
run, for caches of 10 k to 10 M rows, with schema 1 side by side where it finishes.

    python bench/cache_scale.py            # 10k, 100k, 1M, 10M rows at dim 128; 1M at dim 2048; 200k-file no-op extract
    python bench/cache_scale.py --quick    # 2k and 20k rows, 2k-file no-op (CI: the script runs and the numbers are sane)
    python bench/cache_scale.py --json     # one JSON object instead of the table

Synthetic rows (no model) go through ``CacheWriter`` with a commit every 1,000 rows, as
``extract`` commits; each measurement runs in a fresh process, whose peak RSS comes from
``wait4``. Reported per cache size: seconds per commit near the end of the run (the commit
alone; merges are timed apart), total seconds, bytes written by the process (``wchar``)
divided by the bytes of embeddings (write amplification), tiered merges (count, seconds,
the longest), a full compaction afterwards in its own process (seconds, and how much its
peak RSS grew over the process before it started), ``load_cache`` seconds, and the run's
peak RSS. Ratios are computed from this one run on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import run_json  # noqa: E402

COMMIT_ROWS = 1000
CLASSES = 1000


def _wchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


def _rows(start: int, n: int, dim: int, rng):
    import numpy as np

    ids = np.arange(start, start + n)
    paths = [f"c{i % CLASSES:03d}/{i:09d}.jpg" for i in ids.tolist()]
    return paths, (ids % CLASSES).astype(np.int32), rng.standard_normal((n, dim), dtype=np.float32)


def worker_write(path: str, rows: int, dim: int, schema: int) -> dict:
    """Write ``rows`` synthetic rows, committing every 1,000; timings from inside the writer."""
    import numpy as np

    from pipeline.store import CacheWriter, WriterLock, new_cache_meta

    meta = new_cache_meta("synthetic", dim, [f"c{i:03d}" for i in range(CLASSES)], layout="imagefolder")
    rng = np.random.default_rng(0)
    w0, t0 = _wchar(), time.perf_counter()
    tail = max(10, rows // COMMIT_ROWS // 100)  # commits averaged at the end of the run ("a commit at N")
    times: list[float] = []
    if schema == 1:
        from schema1 import Schema1Writer

        writer = Schema1Writer(Path(path), meta)
        for start in range(0, rows, COMMIT_ROWS):
            paths, labels, emb = _rows(start, min(COMMIT_ROWS, rows - start), dim, rng)
            writer.add(paths, emb, labels=labels.tolist())
            c0 = time.perf_counter()
            writer.commit()
            times.append(time.perf_counter() - c0)
        stats = {}
    else:
        with WriterLock(Path(path)):
            writer = CacheWriter(path, meta)
            for start in range(0, rows, COMMIT_ROWS):
                paths, labels, emb = _rows(start, min(COMMIT_ROWS, rows - start), dim, rng)
                writer.add_columns(paths, emb, labels=labels)
                writer.commit()
                times.append(writer.stats.last_commit_seconds)
            writer.close()
        s = writer.stats
        stats = {"merges": s.merges, "merge_seconds": round(s.merge_seconds, 2), "longest_merge_seconds": round(s.largest_merge_seconds, 2),
                 "merged_rows": s.merged_rows, "parts": len(writer.manifest.parts)}
    seconds = time.perf_counter() - t0
    written = _wchar() - w0
    return {"rows": rows, "dim": dim, "schema": schema, "seconds": round(seconds, 2), "commits": len(times),
            "commit_at_n_ms": round(1000 * float(np.mean(times[-tail:])), 2), "first_commits_ms": round(1000 * float(np.mean(times[:tail])), 2),
            "bytes_written": written, "write_amplification": round(written / (rows * dim * 4), 3), **stats}


def worker_compact(path: str) -> dict:
    from pipeline.store import CacheWriter, WriterLock, read_cache_meta

    meta = read_cache_meta(path)
    with WriterLock(Path(path)):
        writer = CacheWriter(path, meta)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        writer.compact(full=True)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 2), "rss_before_mib": round(before / 1024, 1), "rss_grew_mib": round((after - before) / 1024, 1),
            "parts": len(writer.manifest.parts)}


def worker_load(path: str) -> dict:
    from pipeline import load_cache

    t0 = time.perf_counter()
    c = load_cache(path)
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": len(c), "gib": round(c.embeddings.nbytes / 2**30, 2)}


def worker_noop_setup(folder: str, cache: str, files: int, tiny_hub: str) -> dict:
    """A folder of ``files`` tiny images and a cache that already holds every one of them (rows
    written directly, with the provenance extract computes), so the timed run has nothing to do."""
    import numpy as np

    from pipeline.backbones import load_backbone
    from pipeline.devices import resolve_device
    from pipeline.extract import build_meta
    from pipeline.images import scan_folder
    from pipeline.store import CacheWriter, WriterLock

    root = Path(folder)
    blob = (ROOT / "tests" / "tiny_backbone.py").read_bytes()[:64]  # content is never read by a no-op run
    for i in range(files):
        p = root / f"c{i % 100:03d}" / f"{i:07d}.png"
        if i < 100:
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    scan = scan_folder(root)
    backbone = load_backbone(tiny_hub, "none")
    meta = build_meta(backbone, scan, "float32", resolve_device("cpu"))
    with WriterLock(Path(cache)):
        w = CacheWriter(cache, meta)
        recs = scan.records
        for start in range(0, len(recs), 50_000):
            chunk = recs[start : start + 50_000]
            w.add_columns([r.relpath for r in chunk], np.zeros((len(chunk), backbone.embed_dim), np.float32), labels=[r.label for r in chunk],
                          size=[r.size for r in chunk], mtime_ns=[r.mtime_ns for r in chunk])
            w.commit()
        w.close()
    return {"files": len(recs)}


def _peak_mib(usage) -> float:
    return round(usage.ru_maxrss / 1024, 1)


def _worker(*args: str) -> tuple[dict, object]:
    return run_json([sys.executable, __file__, "--worker", *args], cwd=ROOT)


def measure_size(work: Path, rows: int, dim: int, schema: int, log) -> dict:
    path = work / f"s{schema}-{rows}-{dim}.h5"
    out, usage = _worker("write", str(path), str(rows), str(dim), str(schema))
    out["peak_rss_mib"] = _peak_mib(usage)
    log(f"  schema {schema}, {rows:,} x {dim}: {out['seconds']} s, commit {out['commit_at_n_ms']} ms at N, amplification {out['write_amplification']}")
    if schema == 2:
        comp, usage = _worker("compact", str(path))
        out["full_compaction"] = {**comp, "peak_rss_mib": _peak_mib(usage)}
    load, usage = _worker("load", str(path))
    out["load"] = {**load, "peak_rss_mib": _peak_mib(usage)}
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    path.unlink(missing_ok=True)
    return out


def measure_noop(work: Path, files: int, log) -> dict:
    from tiny_backbone import write_tiny_hub

    hub = write_tiny_hub(work / "hub")
    folder, cache = work / "files", work / "noop.h5"
    t0 = time.perf_counter()
    _worker("noop-setup", str(folder), str(cache), str(files), hub)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "-m", hub, "-w", "none", "--out", str(cache), "--device", "cpu",
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"no-op extract failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  no-op extract over {files:,} files: {wall:.1f} s (new {summary['new']}, cached {summary['cached']})")
    shutil.rmtree(folder, ignore_errors=True)
    return {"files": files, "wall_seconds": round(wall, 2), "extract_seconds": summary["seconds"], "new": summary["new"], "cached": summary["cached"],
            "setup_seconds": round(setup, 1)}


def table(result: dict) -> str:
    lines = [f"{'rows x dim':>18} {'schema':>6} {'commit at N':>12} {'vs 10k':>7} {'total s':>8} {'write amp':>9} {'merges (s, longest)':>20} "
             f"{'full compaction: s, peak RSS (grew)':>36} {'load_cache: s, peak RSS':>24} {'writer peak RSS':>16}"]
    smallest = min(r["rows"] for r in result["sizes"])
    base = {s["schema"]: s["commit_at_n_ms"] for s in result["sizes"] if s["rows"] == smallest and s["dim"] == 128}
    for s in result["sizes"]:
        ratio = f"{s['commit_at_n_ms'] / base[s['schema']]:.2f}" if s["schema"] in base and s["dim"] == 128 else "-"
        merges = f"{s['merges']} ({s['merge_seconds']}, {s['longest_merge_seconds']})" if s["schema"] == 2 else "-"
        comp = s.get("full_compaction")
        comp_txt = f"{comp['seconds']} s, {comp['peak_rss_mib']:.0f} MiB (+{comp['rss_grew_mib']:.0f})" if comp else "-"
        load = f"{s['load']['seconds']:.2f} s, {s['load']['peak_rss_mib']:.0f} MiB"
        lines.append(f"{s['rows']:>12,} x {s['dim']:<5} {s['schema']:>6} {s['commit_at_n_ms']:>9.1f} ms {ratio:>7} {s['seconds']:>8.1f} "
                     f"{s['write_amplification']:>9.2f} {merges:>20} {comp_txt:>36} {load:>24} {s['peak_rss_mib']:>12.0f} MiB")
    n = result.get("noop")
    if n:
        lines.append(f"no-op extract over {n['files']:,} unchanged files: {n['wall_seconds']} s wall, interpreter start and folder scan included "
                     f"(after the scan: {n['extract_seconds']} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one; needs ~20 GB free for the full run)")
    parser.add_argument("--sizes", default=None, help="comma-separated row counts at dim 128 (default 10000,100000,1000000,10000000)")
    parser.add_argument("--wide", type=int, default=None, help="rows at dim 2048 (default 1000000; 0 = skip)")
    parser.add_argument("--schema1-max", type=int, default=None, help="largest size also written as schema 1 (default 100000)")
    parser.add_argument("--files", type=int, default=None, help="files in the no-op extract folder (default 200000; 0 = skip)")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"write": lambda p, r, d, s: worker_write(p, int(r), int(d), int(s)), "compact": worker_compact, "load": worker_load,
              "noop-setup": lambda f, c, n, h: worker_noop_setup(f, c, int(n), h)}[kind]
        print(json.dumps(fn(*rest)))
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([2000, 20000] if args.quick else [10_000, 100_000, 1_000_000, 10_000_000])
    wide = args.wide if args.wide is not None else (0 if args.quick else 1_000_000)
    schema1_max = args.schema1_max if args.schema1_max is not None else (20_000 if args.quick else 100_000)
    files = args.files if args.files is not None else (2000 if args.quick else 200_000)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    work = Path(args.dir or tempfile.mkdtemp(prefix="featcache-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"sizes": [], "commit_rows": COMMIT_ROWS, "cpu_count": os.cpu_count()}
    try:
        for rows in sizes:
            result["sizes"].append(measure_size(work, rows, 128, 2, log))
            if rows <= schema1_max:
                result["sizes"].append(measure_size(work, rows, 128, 1, log))
        if wide:
            result["sizes"].append(measure_size(work, wide, 2048, 2, log))
        if files:
            result["noop"] = measure_noop(work, files, log)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    v2 = [s for s in result["sizes"] if s["schema"] == 2 and s["dim"] == 128]
    result["ratios"] = {"commit_largest_over_smallest": round(v2[-1]["commit_at_n_ms"] / v2[0]["commit_at_n_ms"], 2),
                        "write_amplification_largest": v2[-1]["write_amplification"]}
    if args.json_out:
        args.json_out.write_text(json.dumps(result))
    print(json.dumps(result) if args.json else table(result) + f"\nratios: {result['ratios']}")


if __name__ == "__main__":
    main()
