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
- the peers, on the same cache and rows: ``cleanlab``, the recipe of cleanlab's tutorials
  (scikit-learn ``LogisticRegression()`` out of fold by 5-fold ``cross_val_predict`` on the raw
  embeddings, then ``cleanlab.filter.find_label_issues`` with its defaults), and ``neighbors``,
  what FiftyOne's scikit-learn similarity backend does for near-duplicates (a brute
  ``NearestNeighbors`` radius search at cosine distance on the raw embeddings, here at the same
  0.96 similarity). A peer that fails or runs past 15 minutes is reported, not fatal;
- label errors on real embeddings, featcache beside cleanlab's recipe: the demo digits through
  a random-init resnet18 with 5 % of the labels flipped (3 seeds; --quick: 1 seed, 400 digits).
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
              "          'estimate': a.estimate.to_dict() if a.estimate is not None else None,\n"
              "          'phases': {k: round(v, 2) for k, v in a.seconds.items()}}"),
    # The peers, on the same cache: what cleanlab's tutorials do (scikit-learn's LogisticRegression
    # with its defaults, 5-fold cross_val_predict on the raw embeddings, then find_label_issues with
    # its defaults), and what FiftyOne's sklearn similarity backend does for near-duplicates (brute
    # radius search at cosine distance on the raw embeddings; here at the same 0.96 similarity).
    "cleanlab": ("from pipeline import load_cache\n"
                 "sys.path.insert(0, %r); from report import cleanlab_recipe\n"
                 "d = load_cache(CACHE)\n"
                 "issues = cleanlab_recipe(d.embeddings, d.labels)\n"
                 "result = {'counts': {'label-errors': len(issues)}, 'label_errors': [str(p) for p in d.paths[issues]]}") % str(Path(__file__).parent),
    "neighbors": ("from pipeline import load_cache\n"
                  "from sklearn.neighbors import NearestNeighbors\n"
                  "d = load_cache(CACHE)\n"
                  "nn = NearestNeighbors(radius=1 - 0.96, metric='cosine', algorithm='brute').fit(d.embeddings)\n"
                  "hits = nn.radius_neighbors(d.embeddings, return_distance=False)\n"
                  "pairs = [[str(d.paths[i]), str(d.paths[j])] for i, row in enumerate(hits) for j in row if j > i]\n"
                  "result = {'counts': {'duplicates': len(pairs)}, 'pairs': pairs}"),
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


PEERS = {"cleanlab": "audit", "neighbors": "audit"}  # peer step -> our step doing the same work
PEER_TIMEOUT = 900


def cleanlab_recipe(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The rows cleanlab's tutorials flag: scikit-learn ``LogisticRegression()`` with its
    defaults, out of fold by 5-fold ``cross_val_predict``, then ``find_label_issues`` with its
    defaults, ranked by self-confidence. Raises ImportError without cleanlab."""
    import warnings

    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tutorials' max_iter=100 does not converge here: as users run it
        proba = cross_val_predict(LogisticRegression(), X, labels, cv=5, method="predict_proba")
    return find_label_issues(labels, proba, return_indices_ranked_by="self_confidence")


def hit_rates(found, truth) -> tuple[float, float]:
    """(precision, recall) of the ``found`` set against the ``truth`` set."""
    hits = len(set(found) & set(truth))
    return hits / max(1, len(found)), hits / len(truth)


def run_child(step: str, case: dict) -> dict:
    code = CHILD % (str(ROOT), f"CACHE, HEAD, OUT = {case['cache']!r}, {case['head']!r}, {case['out']!r}\n" + STEPS[step])
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PEER_TIMEOUT if step in PEERS else None)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {PEER_TIMEOUT} s"}
    if step == "cleanlab" and "No module named 'cleanlab'" in proc.stderr:
        return {"skipped": "cleanlab is not installed (pip install cleanlab, or the project's test extra)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digits_side_by_side(seeds: int, tmp: Path, per_class: int | None = None) -> list[dict]:
    """Label errors on real embeddings: the 1,797 demo digits (32 px) through a seeded
    random-init resnet18, 5 % of the labels moved to another class per seed; featcache's
    out-of-fold logreg + confident learning against ``cleanlab_recipe`` on the raw 512-d
    embeddings, timed side by side in this process."""
    sys.path.insert(0, str(ROOT))
    from pipeline import load_cache
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.quality import AuditOptions, run_audit

    try:
        import cleanlab  # noqa: F401
    except ImportError:
        return []
    cache = tmp / "digits.h5"
    run_extract(write_digits(tmp / "digits", size=32, per_class=per_class), "resnet18", "none", cache, batch_size=64)
    d = load_cache(cache)
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        flipped = rng.choice(len(d.labels), int(round(0.05 * len(d.labels))), replace=False)
        noisy = d.labels.copy()
        noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, len(flipped))) % 10
        t = time.perf_counter()
        audit = run_audit(d.embeddings, noisy, np.array(["train"] * len(noisy), dtype=object), d.paths, d.classes, AuditOptions())
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        peer = cleanlab_recipe(d.embeddings, noisy)
        peer_s = time.perf_counter() - t
        row = {"seed": seed, "rows": len(noisy), "flipped": len(flipped)}
        for name, found, seconds in (("featcache", audit.label_error_rows(), ours_s), ("cleanlab", peer, peer_s)):
            precision, recall = hit_rates(found.tolist(), flipped.tolist())
            row[name] = {"flagged": len(found), "precision": precision, "recall": recall, "seconds": seconds}
        est = audit.estimate
        row["featcache"]["estimate"] = est.to_dict() if est is not None else None  # its own guess, from planted flips (no ground truth)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 x 256 (CI)")
    ap.add_argument("--rows", type=int, default=None, help="rows (default 50,000; --quick 3,000)")
    ap.add_argument("--dim", type=int, default=None, help="embedding width (default 2,048; --quick 256)")
    ap.add_argument("--classes", type=int, default=None, help="classes (default 100; --quick 20)")
    ap.add_argument("--images", type=int, default=None, help="generated JPEGs the rows link to (default 500; --quick 50)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="skip the peers (cleanlab's recipe for label errors, a brute scikit-learn radius search for duplicates)")
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
        steps = [s for s in STEPS if args.peers or s not in PEERS]
        results = {step: run_child(step, case) for step in steps}
        seeds, per_class = (1, 40) if args.quick else (3, None)  # --quick: 400 digits
        digits = digits_side_by_side(seeds, Path(tmp), per_class=per_class) if args.peers else []
    out["digits"] = digits
    failed = [s for s, r in results.items() if "error" in r and s not in PEERS]  # a peer that fails or times out is a finding, not a broken bench
    for r in results.values():
        if "label_errors" in r:
            r["label_errors_precision"], r["label_errors_recall"] = hit_rates(r.pop("label_errors"), case["flipped"])
        if "pairs" in r:
            pairs = {frozenset(p) for p in r.pop("pairs")}
            r["copies_found"] = len(pairs & case["copies"])
            r["copies_planted"] = len(case["copies"])
    out.update({"flipped": len(case["flipped"]), "steps": results})
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{rows:,} x {dim:,} float32, {classes} classes, rows linked to {n_images} JPEGs, {os.cpu_count()} cores; setup {out['setup_seconds']}s "
              "(cache, links, head; not measured); each step in its own process")
        print(f"  {'step':<8} {'seconds':>8} {'peak MiB':>9}  findings")
        for step, r in results.items():
            name = f"{step} (peer)" if step in PEERS else step
            if "error" in r or "skipped" in r:
                print(f"  {name:<16} {'failed' if 'error' in r else 'skipped'}: {r.get('error') or r['skipped']}")
                continue
            found = []
            if "label_errors_precision" in r:
                found.append(f"{r['counts']['label-errors']} label errors (precision {r['label_errors_precision']:.2f}, recall {r['label_errors_recall']:.2f} "
                             f"of {len(case['flipped'])} flipped)")
            if "copies_found" in r:
                leaks = f" ({r['counts']['leaks']} leaks)" if "leaks" in r["counts"] else ""
                found.append(f"{r['counts']['duplicates']} pairs{leaks}, {r['copies_found']}/{r['copies_planted']} planted copies found")
            if r.get("estimate"):
                e = r["estimate"]
                found.append(f"estimated on {e['planted']} planted flips: precision {e['precision']:.2f}, recall {e['recall']:.2f}"
                             + ("" if e["reliable"] else " (not reliable: listed as hardest examples)"))
            if "phases" in r:
                found.append(f"phases {r['phases']}")
            if step == "report":
                found.append(f"{r['thumbnails']} thumbnails, {r['mistakes']:,} mistakes (val accuracy {r['val_accuracy']:.3f}), {r['html_mib']:.1f} MiB of HTML")
            print(f"  {name:<16} {r['seconds']:8.1f} {r['peak_rss_mib']:9.0f}  {'; '.join(found)}")
        ours = {s: r for s, r in results.items() if s not in PEERS and "error" not in r}
        if ours:
            print(f"  goal: each under 60 s and 2,048 MiB here -> {'met' if all(r['seconds'] < 60 and r['peak_rss_mib'] < 2048 for r in ours.values()) else 'NOT met'}")
        peers = [s for s in PEERS if s in results and "seconds" in results[s] and "seconds" in results.get(PEERS[s], {})]
        if peers:
            print("  side by side: " + "; ".join(f"{PEERS[s]} does {s}'s work and more in {results[PEERS[s]]['seconds'] / results[s]['seconds']:.2f}x its time"
                                                 for s in peers)
                  + f"; audit also does both peers' work in {results['audit']['seconds'] / sum(results[s]['seconds'] for s in peers):.2f}x their sum")
        if digits:
            print(f"label errors on real embeddings ({digits[0]['rows']:,} demo digits, random-init resnet18, 5 % of labels flipped), side by side:")
            for r in digits:
                a, b = r["featcache"], r["cleanlab"]
                print(f"  seed {r['seed']}: featcache {a['flagged']} flagged, precision {a['precision']:.2f}, recall {a['recall']:.2f}, {a['seconds']:.1f}s | "
                      f"cleanlab's recipe {b['flagged']} flagged, precision {b['precision']:.2f}, recall {b['recall']:.2f}, {b['seconds']:.1f}s "
                      f"| time ratio {a['seconds'] / b['seconds']:.2f}")
                if a.get("estimate"):
                    e = a["estimate"]
                    print(f"    featcache's own estimate on {e['planted']} planted flips: precision {e['precision']:.2f}, recall {e['recall']:.2f}"
                          f" ({'reliable' if e['reliable'] else 'NOT reliable: hardest examples'})")
    if failed:  # a step that did not run is a broken bench (CI runs --quick)
        raise SystemExit(f"{len(failed)} step(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
