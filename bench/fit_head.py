"""Stage 2: fit-head on a cache vs the tutorials' training through the frozen backbone.

    python bench/fit_head.py            # 50,000 x 2048 float32 synthetic cache, 10 classes
    python bench/fit_head.py --quick    # tiny, for CI

Each head is fitted in its own subprocess (seconds and peak RSS). The tutorials' method
re-runs the frozen backbone over every image every epoch: we measure one resnet50 forward
pass over demo images on this machine and extrapolate to the same rows and epochs
(stated as an extrapolation, not run: it would take hours here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_cache(path: Path, rows: int, dim: int, classes: int) -> None:
    from pipeline.store.writer import CacheWriter, PendingRow

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    meta = {"model": "synthetic", "weights": "none", "preprocessing": {}, "embed_dim": dim, "dtype": "float32",
            "data_root": "/synthetic", "layout": "imagefolder", "classes": [f"c{i}" for i in range(classes)]}
    w = CacheWriter(path, meta)
    for start in range(0, rows, 10000):
        n = min(10000, rows - start)
        y = rng.integers(0, classes, n)
        X = centers[y] * 0.3 + rng.normal(0, 1, (n, dim)).astype(np.float32)
        w.add([PendingRow(f"c{l}/{start + i}.jpg", int(l), "", 1, 1, "") for i, l in enumerate(y)], X)
        w.commit()


def fit_in_child(cache: Path, kind: str, params: dict) -> dict:
    code = (
        "import json,sys,time,resource; sys.path.insert(0, %r)\n"
        "from pipeline.heads import fit_head\n"
        "t=time.perf_counter(); r=fit_head(%r, %r, %r, plots=False, **json.loads(%r))\n"
        "print(json.dumps({'seconds': time.perf_counter()-t, 'fit_seconds': r.seconds, 'accuracy': r.metrics['val']['accuracy'],"
        " 'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))"
    ) % (str(ROOT), str(cache), kind, str(cache) + f".{kind}.pt", json.dumps(params))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def backbone_images_per_s(n: int = 64) -> float:
    import torch

    from pipeline.backbones.registry import load_backbone
    from pipeline.extract import embed_batch, prepare_model

    bb = load_backbone("resnet50", "none")
    net = prepare_model(bb, torch.device("cpu"))
    x = torch.randn(32, 3, 224, 224)
    embed_batch(net, x, torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(max(1, n // 32)):
        embed_batch(net, x, torch.device("cpu"))
    return max(1, n // 32) * 32 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=25, help="epochs assumed for the tutorials' method")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.dim = 2000, 256
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "synthetic.h5"
        t0 = time.perf_counter()
        make_cache(cache, args.rows, args.dim, 10)
        print(f"synthetic cache {args.rows} x {args.dim} float32, 10 classes ({time.perf_counter() - t0:.1f}s to write)")
        heads = {"logreg (C=1, no CV)": ("logreg", {"C": 1.0}), "linear": ("linear", {}), "mlp 512-256": ("mlp", {})}
        results = {name: fit_in_child(cache, kind, params) for name, (kind, params) in heads.items()}
    ips = backbone_images_per_s(32 if args.quick else 64)
    tutorial_s = args.epochs * args.rows / ips
    print(f"{'head':<22} {'fit s':>8} {'total s':>8} {'peak RSS MiB':>13} {'val acc':>8}")
    for name, r in results.items():
        print(f"{name:<22} {r['fit_seconds']:8.1f} {r['seconds']:8.1f} {r['peak_rss_mib']:13.0f} {r['accuracy']:8.3f}")
    print(f"tutorials' method: resnet50 forward {ips:.1f} img/s here -> {args.epochs} epochs x {args.rows} images = "
          f"{tutorial_s / 3600:.1f} h (extrapolated from one measured pass, not run)")
    slowest = max(r["seconds"] for r in results.values())
    print(f"ratio tutorials / slowest head fit = {tutorial_s / slowest:.0f}x")


if __name__ == "__main__":
    main()
