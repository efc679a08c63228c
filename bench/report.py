"""Report and audit at scale: seconds and peak RSS on synthetic embeddings, with what they found.

    python bench/report.py              # 50,000 x 2,048, 100 classes, thumbnails from 500 images (goal: each < 60 s, < 2 GiB)
    python bench/report.py --quick      # 3,000 x 256, 20 classes, 50 images (CI: the bench runs and finds what was planted)
    python bench/report.py --json       # one JSON object

The cache: low-rank, ReLU-like class structure (a linear probe is right about 98 times in
100), 2 % of the labels moved to another class on purpose, and 100 validation rows that are
copies of training rows (half exact, half with 1 % noise). Every row's path is a link to one
of the generated JPEGs, so the report's thumbnails read and decode real files. A logreg head
(fixed C: fitting is not what is measured) is fitted on it; then, each in its own process:
- ``audit CACHE``: label errors (5-fold out-of-fold logreg + confident learning), near-duplicates
  and leaks (exact blocked search), imbalance, failed files;
- ``report HEAD``: everything above again plus scoring the head, mistakes with their nearest
  training rows, the 2-D map and the HTML file, with up to 64 images per section.
Peak RSS is the child's own high-water mark (``VmHWM``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PEAK_RSS_SOURCE, hard_features

ROOT = Path(__file__).resolve().parents[1]
CHILD = (
    "import json, sys, time; sys.path.insert(0, %r)\n"
    "t0 = time.perf_counter()\n"
    "%s\n"
    + PEAK_RSS_SOURCE
    + "print(json.dumps({**result, 'seconds': time.perf_counter() - t0, 'peak_rss_mib': peak_rss_mib()}))\n"
)
STEPS = {
    "audit": ("from pipeline.quality import audit_cache\n"
              "a = audit_cache(CACHE)\n"
              "result = {'counts': a.counts(), 'label_errors': [str(p) for p in a.paths[a.label_error_rows()]],\n"
              "          'pairs': [[str(a.paths[i]), str(a.paths[j])] for i, j in zip(a.duplicates.pairs.i, a.duplicates.pairs.j)],\n"
              "          'phases': {k: round(v, 2) for k, v in a.seconds.items()}}"),
    "report": ("from pipeline.quality import ReportOptions\n"
               "from pipeline.report import write_report\n"
               "r = write_report(HEAD, out=OUT, options=ReportOptions(max_images=64))\n"
               "result = {'counts': r.counts, 'thumbnails': r.thumbnails, 'missing': r.missing_images, 'mistakes': r.mistakes,\n"
               "          'html_mib': __import__('os').path.getsize(OUT) / 2**20, 'val_accuracy': r.metrics['val']['accuracy']}"),
}


def images(folder: Path, n: int) -> list[Path]:
    """``n`` small generated JPEGs (a colour gradient and noise each)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    yy, xx = np.mgrid[0:96, 0:96] / 96
    for i in range(n):
        c = rng.uniform(0, 255, (2, 3))
        img = c[0] * xx[..., None] + c[1] * yy[..., None] + rng.normal(0, 20, (96, 96, 3))
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)
        out.append(path)
    return out


def make_case(tmp: Path, rows: int, dim: int, classes: int, n_images: int, n_copies: int) -> dict:
    """The cache, its head, and what was planted (flipped rows, copied rows), by path."""
    sys.path.insert(0, str(ROOT))
    from pipeline.heads import assign_splits, fit_head
    from pipeline.store import CacheWriter, PendingRow, new_cache_meta

    X, y = hard_features(rows, dim, classes, rank=64, separation=1.0, spread=0.45)  # separable: a linear probe is right ~98 % of the time
    names = [f"c{k:03d}" for k in range(classes)]
    paths = [f"{names[label]}/{i:06d}.jpg" for i, label in enumerate(y)]
    split, _ = assign_splits(paths, y, [""] * rows, 0.2, 0)
    rng = np.random.default_rng(2)
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    src, dst = rng.choice(train, n_copies, replace=False), rng.choice(val, n_copies, replace=False)
    X[dst] = X[src]
    X[dst[n_copies // 2 :]] *= 1 + rng.normal(0, 0.01, (n_copies - n_copies // 2, dim)).astype(np.float32)
    y[dst] = y[src]  # a copy has its source's class (its path, and so its split, stays: the label is stored with the row)
    keep = np.setdiff1d(np.arange(rows), np.concatenate([src, dst]))
    flipped = rng.choice(keep, int(0.02 * rows), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, classes, len(flipped))) % classes  # the files stay in their folders: only the label is wrong
    data = tmp / "images"
    pool = images(tmp / "pool", n_images)
    for i, p in enumerate(paths):  # every row's file: a link to one of the generated images
        target = data / p
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(pool[i % len(pool)], target)
    cache = tmp / "synthetic.h5"
    writer = CacheWriter(cache, new_cache_meta("synthetic", dim, names, weights="none", data_root=str(data), layout="imagefolder"))
    for s in range(0, rows, 10_000):
        writer.add([PendingRow(paths[i], int(noisy[i]), "", 1, 1, "") for i in range(s, min(rows, s + 10_000))], X[s : s + 10_000])
        writer.commit()
    writer.close()
    head = fit_head(cache, "logreg", tmp / "synthetic.logreg.head.pt", plots=False, C=0.1).head_path
    return {"cache": str(cache), "head": head, "out": str(tmp / "report.html"), "flipped": {paths[i] for i in flipped},
            "copies": {frozenset((paths[a], paths[b])) for a, b in zip(src, dst)}}


def run_child(step: str, case: dict) -> dict:
    code = CHILD % (str(ROOT), f"CACHE, HEAD, OUT = {case['cache']!r}, {case['head']!r}, {case['out']!r}\n" + STEPS[step])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 x 256 (CI)")
    ap.add_argument("--rows", type=int, default=None, help="rows (default 50,000; --quick 3,000)")
    ap.add_argument("--dim", type=int, default=None, help="embedding width (default 2,048; --quick 256)")
    ap.add_argument("--classes", type=int, default=None, help="classes (default 100; --quick 20)")
    ap.add_argument("--images", type=int, default=None, help="generated JPEGs the rows link to (default 500; --quick 50)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    rows = args.rows or (3_000 if args.quick else 50_000)
    dim = args.dim or (256 if args.quick else 2_048)
    classes = args.classes or (20 if args.quick else 100)
    n_images = args.images or (50 if args.quick else 500)
    n_copies = 20 if args.quick else 100
    out: dict = {"rows": rows, "dim": dim, "classes": classes, "images": n_images, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        case = make_case(Path(tmp), rows, dim, classes, n_images, n_copies)
        out["setup_seconds"] = round(time.perf_counter() - t0, 1)
        results = {step: run_child(step, case) for step in STEPS}
    failed = [s for s, r in results.items() if "error" in r]
    audit = results["audit"]
    if "error" not in audit:
        found = set(audit.pop("label_errors"))
        hits = len(found & case["flipped"])
        pairs = {frozenset(p) for p in audit.pop("pairs")}
        audit["label_errors_precision"] = hits / max(1, len(found))
        audit["label_errors_recall"] = hits / len(case["flipped"])
        audit["copies_found"] = len(pairs & case["copies"])
        audit["copies_planted"] = len(case["copies"])
    out.update({"flipped": len(case["flipped"]), "steps": results})
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{rows:,} x {dim:,} float32, {classes} classes, rows linked to {n_images} JPEGs, {os.cpu_count()} cores; setup {out['setup_seconds']}s "
              "(cache, links, head; not measured); each step in its own process")
        print(f"  {'step':<8} {'seconds':>8} {'peak MiB':>9}  findings")
        for step, r in results.items():
            if "error" in r:
                print(f"  {step:<8} failed: {r['error']}")
                continue
            if step == "audit":
                notes = (f"{r['counts']['label-errors']} label errors (precision {r['label_errors_precision']:.2f}, recall {r['label_errors_recall']:.2f} "
                         f"of {len(case['flipped'])} flipped); {r['counts']['duplicates']} pairs ({r['counts']['leaks']} leaks), {r['copies_found']}/"
                         f"{r['copies_planted']} planted copies found; phases {r['phases']}")
            else:
                notes = (f"{r['thumbnails']} thumbnails, {r['mistakes']:,} mistakes (val accuracy {r['val_accuracy']:.3f}), {r['html_mib']:.1f} MiB of HTML")
            print(f"  {step:<8} {r['seconds']:8.1f} {r['peak_rss_mib']:9.0f}  {notes}")
        ok = [r for r in results.values() if "error" not in r]
        if ok:
            print(f"  goal: each under 60 s and 2,048 MiB here -> {'met' if all(r['seconds'] < 60 and r['peak_rss_mib'] < 2048 for r in ok) else 'NOT met'}")
    if failed:  # a step that did not run is a broken bench (CI runs --quick)
        raise SystemExit(f"{len(failed)} step(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
