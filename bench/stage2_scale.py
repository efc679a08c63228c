"""Stage 2 and the audit on caches larger than the memory budget (#32): every command that
reads a cache, each in its own process, with its wall time and peak RSS.

    python bench/stage2_scale.py                        # 1,000,000 x 2,048 and 10,000,000 x 128 (hours, ~15 GB of disk)
    python bench/stage2_scale.py --sizes 200000x2048    # one size
    python bench/stage2_scale.py --quick                # 8,000 x 128 and 30,000 x 16 under a 2 MiB budget (CI: proves it runs)

Each cache is written through ``CacheWriter`` a chunk at a time: 100 classes with overlapping,
low-rank structure through a ReLU (bench/common.py's ``hard_features``: accuracy well below 100 %),
plus ``--copies`` near-copies of earlier rows (the row plus noise of 1 % of its scale), kept
in the cache folder between runs. Then, with ``--memory-budget`` (default 1GiB), one process
each: ``fit-head --clf logreg``, ``fit-head --clf linear`` (``--epochs 2``), ``evaluate``,
``predict --cache --out CSV``, the audit (with the planted copies' recall and precision), and
``report``. Side by side on ``--side-rows`` rows of the first size: fit-head logreg in memory
against streamed (forced by the budget), and streamed by 2 torchrun ranks on this machine, in
one run: time ratios, accuracies, and how often the 2-rank head predicts what the 1-process one does.

Printed: one row per command (seconds, peak RSS MiB, what it found), then a JSON summary.
Goals on a 2-core machine (#32): peak RSS <= 2.5 GiB for every command at both sizes; the
streamed logreg within 1.5x the in-memory fit's time, same accuracy; the audit at 10 M x 128
under 30 minutes with planted-copy recall and precision >= 0.95.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import PEAK_RSS_SOURCE  # noqa: E402

CLASSES = 100
CHUNK = 50_000

AUDIT_CHILD = PEAK_RSS_SOURCE + """
import json, logging, sys, time
sys.path.insert(0, {root!r})
logging.basicConfig(filename={log!r}, level=logging.INFO)
from pipeline.quality import AuditOptions, audit_cache
from pipeline.store import read_rows
t0 = time.perf_counter()
a = audit_cache({cache!r}, AuditOptions(memory_budget={budget!r}))
seconds = time.perf_counter() - t0
planted = json.load(open({planted!r}))
where = {{p: i for i, p in enumerate(a.paths.tolist())}}
want = {{tuple(sorted((where[s], where[c]))) for s, c in planted}}
d = a.duplicates
got = {{(int(i), int(j)) for i, j in zip(d.pairs.i, d.pairs.j)}}
hit = len(want & got)
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "pairs": len(got), "planted": len(want),
                  "recall": hit / max(1, len(want)), "precision": hit / max(1, len(got)), "search": d.search.method if d.search else None,
                  "measured_recall": d.search.recall if d.search else None, "label_errors": len(a.label_error_rows()),
                  "oof_accuracy": a.oof.accuracy if a.oof else None}}))
"""


def write_cache(path: Path, rows: int, dim: int, copies: int, seed: int = 0) -> Path:
    """The synthetic cache (module doc), written once: ``path`` and ``path.planted.json``."""
    from pipeline.store import CacheWriter, new_cache_meta

    planted_file = Path(str(path) + ".planted.json")
    if path.exists() and planted_file.exists():
        return planted_file
    rng = np.random.default_rng(seed)
    rank = min(48, dim)
    mix = rng.normal(0, 1, (rank, dim)).astype(np.float32) / np.sqrt(rank)
    centres = rng.normal(0, 0.4, (CLASSES, rank)).astype(np.float32)
    meta = new_cache_meta("synthetic", dim, [f"c{k:03d}" for k in range(CLASSES)], weights="none", data_root="/synthetic")
    base = rows - copies
    src = np.sort(rng.choice(min(base, CHUNK), copies, replace=False))
    planted = []
    t0 = time.perf_counter()
    with CacheWriter.open(path, meta) as w:
        first = None
        for s in range(0, base, CHUNK):
            n = min(CHUNK, base - s)
            y = rng.integers(0, CLASSES, n)
            z = centres[y] + rng.normal(0, 1.0, (n, rank)).astype(np.float32)
            X = np.maximum(z @ mix + rng.normal(0, 0.3, (n, dim)).astype(np.float32), 0)
            if first is None:
                first = (X[src].copy(), y[src].copy())
            w.add_columns([f"c{c:03d}/{s + i:08d}.jpg" for i, c in enumerate(y)], X, labels=y)
        Xc, yc = first
        Xc = Xc + rng.normal(0, 0.01, Xc.shape).astype(np.float32)
        names = [f"c{c:03d}/{base + i:08d}.jpg" for i, c in enumerate(yc)]
        w.add_columns(names, Xc, labels=yc)
        planted = [(f"c{yc[i]:03d}/{int(s_):08d}.jpg", names[i]) for i, s_ in enumerate(src)]
    planted_file.write_text(json.dumps(planted))
    print(f"wrote {path} ({rows:,} x {dim}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return planted_file


def rss_of(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``: its last JSON line, wall seconds, peak RSS of that process alone (``wait4``),
    and whether it said it streams. stderr goes to a file (a pipe left unread could fill and stall it)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read()
    code = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd[1:5])} failed (exit {code}):\n{err[-3000:]}")
    result = json.loads(lines[-1])
    said = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)
    result.update(wall_s=round(time.perf_counter() - t0, 1), peak_rss_mib=round(usage.ru_maxrss / 1024), streamed="over --memory-budget" in said)
    return result


def commands(cache: Path, planted: Path, budget: str, work: Path) -> list[tuple[str, list[str], Callable[[dict], str]]]:
    py, cli = sys.executable, str(ROOT / "cli.py")
    cli = [cli, "--log-file", str(work / "command.log")]
    head, linear = work / "logreg.pt", work / "linear.pt"
    mb = ["--memory-budget", budget]
    acc = lambda r: f"val accuracy {r['metrics']['val']['accuracy']:.4f}"  # noqa: E731
    return [
        ("fit-head logreg", [py, *cli, "fit-head", str(cache), "--clf", "logreg", "--out", str(head), "--json", *mb], acc),
        ("fit-head linear", [py, *cli, "fit-head", str(cache), "--clf", "linear", "--epochs", "2", "--out", str(linear), "--json", *mb], acc),
        ("evaluate", [py, *cli, "evaluate", str(head), "--cache", str(cache), "--json", *mb], lambda r: f"val accuracy {r['val']['accuracy']:.4f}"),
        ("predict --cache", [py, *cli, "predict", str(head), "--cache", str(cache), "--out", str(work / "predictions.csv"), "--json", *mb],
         lambda r: f"{r['n']:,} rows predicted"),
        ("audit", [py, "-c", AUDIT_CHILD.format(root=str(ROOT), cache=str(cache), budget=budget, planted=str(planted), log=str(work / "command.log"))],
         lambda r: (f"{r['search']} search: planted copies recall {r['recall']:.3f}, precision {r['precision']:.3f} (audit's measured recall "
                    f"{r['measured_recall']}); {r['label_errors']} label errors")),
        ("report", [py, *cli, "report", str(head), "--out", str(work / "report.html"), "--json", *mb],
         lambda r: f"{r['mistakes']:,} mistakes, {r['counts'].get('duplicates', 0)} duplicate pairs"),
    ]


def side_by_side(cache: Path, budget: str, work: Path) -> dict:
    """fit-head logreg in memory and streamed (under ``budget``) on the same cache, one after the other."""
    py, cli = sys.executable, str(ROOT / "cli.py")
    out = {}
    for name, limit in (("in-memory", "64GiB"), ("streamed", budget)):
        r = rss_of([py, cli, "--log-file", str(work / "command.log"), "fit-head", str(cache), "--clf", "logreg", "--out", str(work / f"side-{name}.pt"),
                    "--json", "--memory-budget", limit], work / "command.log")
        out[name] = {"wall_s": r["wall_s"], "fit_seconds": round(r["fit_seconds"], 1), "peak_rss_mib": r["peak_rss_mib"],
                     "val_accuracy": r["metrics"]["val"]["accuracy"], "streamed": r["streamed"]}
    out["time_ratio_streamed_over_in_memory"] = round(out["streamed"]["fit_seconds"] / out["in-memory"]["fit_seconds"], 2)
    # torchrun: 2 ranks on this machine (they share its cores), each streaming half the rows under the same budget
    cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", cli, "--log-file", str(work / "command.log"), "fit-head", str(cache),
           "--clf", "logreg", "--out", str(work / "side-torchrun.pt"), "--json", "--memory-budget", budget]
    r = rss_of(cmd, work / "command.log")
    out["torchrun-2-ranks"] = {"wall_s": r["wall_s"], "fit_seconds": round(r["fit_seconds"], 1), "val_accuracy": r["metrics"]["val"]["accuracy"]}
    out["time_ratio_2_ranks_over_1"] = round(out["torchrun-2-ranks"]["fit_seconds"] / out["streamed"]["fit_seconds"], 2)
    out["same_predictions_2_ranks"] = _same_predictions(work / "side-torchrun.pt", work / "side-streamed.pt", cache)
    return out


def _same_predictions(a: Path, b: Path, cache: Path) -> float:
    """Share of the cache's first 50,000 rows on which two heads predict the same class."""
    from pipeline.heads import load_head
    from pipeline.quality.spill import CacheRows
    from pipeline.store import read_rows

    with read_rows(cache) as table:
        X = CacheRows(table)[: min(50_000, len(table))]
    return float((load_head(a).head.predict(X) == load_head(b).head.predict(X)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000x2048,10000000x128", help="ROWSxDIM, comma-separated")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--side-rows", type=int, default=250_000, help="rows of the in-memory vs streamed logreg (the first size's width); 0: skip it")
    ap.add_argument("--folder", type=Path, default=ROOT / "cache" / "bench-stage2")
    ap.add_argument("--only", default="", help="comma-separated commands to run, in this order (default: all); evaluate, predict and report "
                                                "need the logreg head of an earlier run or of 'fit-head logreg' before them")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.budget, args.copies, args.side_rows = "8000x128,30000x16", "2MiB", 50, 8_000
        args.folder = args.folder.with_name(args.folder.name + "-quick")
    args.folder.mkdir(parents=True, exist_ok=True)
    summary: dict = {"budget": args.budget, "cores": len(os.sched_getaffinity(0)), "sizes": {}}
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    for rows, dim in sizes:
        cache = args.folder / f"synthetic-{rows}x{dim}.h5"
        planted = write_cache(cache, rows, dim, min(args.copies, rows // 10))
        work = args.folder / f"work-{rows}x{dim}"
        work.mkdir(exist_ok=True)
        table = {}
        print(f"\n{rows:,} x {dim}, --memory-budget {args.budget} ({rows * dim * 4 / 2**30:.2f} GiB of float32 embeddings)")
        print(f"  {'command':<18} {'seconds':>9} {'peak RSS':>10}  streamed  result")
        chosen = commands(cache, planted, args.budget, work)
        if args.only:
            by_name = {name: (name, cmd, describe) for name, cmd, describe in chosen}
            unknown = [n for n in args.only.split(",") if n not in by_name]
            if unknown:
                raise SystemExit(f"--only: unknown command(s) {', '.join(unknown)}; choose among {', '.join(by_name)}")
            chosen = [by_name[n] for n in args.only.split(",")]
        for name, cmd, describe in chosen:
            r = rss_of(cmd, work / "command.log")
            table[name] = {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "streamed": r["streamed"], "result": describe(r)}
            if name == "audit":
                table[name].update({k: r[k] for k in ("recall", "precision", "measured_recall", "search")})
            print(f"  {name:<18} {r['wall_s']:>9.1f} {r['peak_rss_mib']:>7} MiB  {'yes' if r['streamed'] else 'no ':<8}  {describe(r)}", flush=True)
        summary["sizes"][f"{rows}x{dim}"] = table
    rows0, dim0 = sizes[0]
    side_rows = min(args.side_rows, rows0)
    if side_rows <= 0:  # --side-rows 0: the commands alone
        print(json.dumps(summary))
        return
    side = args.folder / f"synthetic-{side_rows}x{dim0}.h5"
    write_cache(side, side_rows, dim0, min(args.copies, side_rows // 10))
    summary["side_by_side"] = {"rows": side_rows, "dim": dim0, **side_by_side(side, args.budget, args.folder)}
    s = summary["side_by_side"]
    print(f"\nfit-head logreg on {side_rows:,} x {dim0}: in memory {s['in-memory']['fit_seconds']}s (acc {s['in-memory']['val_accuracy']:.4f}), "
          f"streamed {s['streamed']['fit_seconds']}s (acc {s['streamed']['val_accuracy']:.4f}): {s['time_ratio_streamed_over_in_memory']}x; "
          f"torchrun 2 ranks {s['torchrun-2-ranks']['fit_seconds']}s ({s['time_ratio_2_ranks_over_1']}x one streamed process, "
          f"same prediction on {100 * s['same_predictions_2_ranks']:.2f} % of rows)")
    worst = max(c["peak_rss_mib"] for t in summary["sizes"].values() for c in t.values())
    summary["worst_peak_rss_mib"] = worst
    print(f"worst peak RSS of any command: {worst} MiB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
