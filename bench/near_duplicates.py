"""Near-duplicates of a large collection: exact blocked search against the FAISS index, side by side.

    python bench/near_duplicates.py                  # 300,000 x 128 unit rows, 1,000 planted copies
    python bench/near_duplicates.py --rows 1000000   # exact search grows with N²: minutes to hours
    python bench/near_duplicates.py --quick          # 20,000 rows (CI: proves the bench runs)

The rows stand for the audit's whitened space (128 components): isotropic gaussian directions,
plus ``--copies`` rows that are slightly perturbed copies of others (cosine ~0.99, as a
re-encoded photo in the whitened space). Both searches run in this process, one after the
other, on the same rows and threshold (0.96); printed: seconds of each, the index's time as a
ratio of exact search's, recall and precision of the planted copies for each, the recall the
audit would print (the index against exact search of 2,000 sampled rows), peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.quality.ann import IndexShape, approximate_pairs_above, measured_recall  # noqa: E402
from pipeline.quality.similarity import pairs_above, unit_rows  # noqa: E402


def planted_rows(n: int, d: int, copies: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32)
    src = rng.choice(n - copies, copies, replace=False)
    X[n - copies :] = X[src] + 0.1 * rng.standard_normal((copies, d), dtype=np.float32)
    return unit_rows(X), {(int(a), int(b)) for a, b in zip(src, range(n - copies, n))}


def score(pairs, planted: set[tuple[int, int]]) -> dict:
    found = set(zip(pairs.i.tolist(), pairs.j.tolist()))
    hit = len(found & planted)
    return {"pairs": len(found), "recall": round(hit / len(planted), 4), "precision": round(hit / len(found), 4) if found else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dims", type=int, default=128)
    ap.add_argument("--copies", type=int, default=1_000)
    ap.add_argument("--threshold", type=float, default=0.96)
    ap.add_argument("--quick", action="store_true", help="20,000 rows, 100 copies")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.copies = 20_000, 100
    U, planted = planted_rows(args.rows, args.dims, args.copies)
    t = time.perf_counter()
    exact = pairs_above(U, args.threshold, max_pairs=10 * args.copies, device="cpu")
    exact_s = time.perf_counter() - t
    shape = IndexShape.for_rows(args.rows)
    t = time.perf_counter()
    approx = approximate_pairs_above(U, args.threshold, max_pairs=10 * args.copies, shape=shape)
    ann_s = time.perf_counter() - t
    t = time.perf_counter()
    recall, measured_on = measured_recall(U, args.threshold, approx, device="cpu")
    recall_s = time.perf_counter() - t
    result = {
        "rows": args.rows, "dims": args.dims, "copies": args.copies, "threshold": args.threshold,
        "index": {"nlist": shape.nlist, "nprobe": shape.nprobe, "train_rows": shape.train_rows},
        "exact": {"seconds": round(exact_s, 2), **score(exact, planted)},
        "ann": {"seconds": round(ann_s, 2), **score(approx, planted)},
        "ann_time_over_exact": round(ann_s / exact_s, 4),
        "audit_recall": recall, "audit_recall_pairs": measured_on, "audit_recall_seconds": round(recall_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.rows:,} x {args.dims} rows, {args.copies:,} planted copies, threshold {args.threshold}")
    for name in ("exact", "ann"):
        r = result[name]
        print(f"  {name:<6} {r['seconds']:8.2f} s  {r['pairs']:,} pairs, planted copies: recall {r['recall']:.4f}, precision {r['precision']}")
    print(f"  index {shape.nlist:,} cells, {shape.nprobe} probed: {result['ann_time_over_exact']:.3f} of exact search's time; "
          f"recall the audit prints {recall} on {measured_on} pairs ({recall_s:.1f} s); peak RSS {result['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
