"""Stage 2 side by side: our heads against the 20-line script they replace, in one run.

    python bench/fit_head.py                 # digits, photo-like images, hard synthetic 50,000 x 2,048 x 100
    python bench/fit_head.py --cases hard    # one case
    python bench/fit_head.py --quick         # small versions of every case (CI: proves the bench runs)

Cases (each a real cache written by this project, the same train/val split for every method):
- digits: the demo's handwritten digits through a random-init resnet18 (512-d, 10 classes);
- photos: generated photo-like images (colour gradients, blobs and stripes per class) through a
  random-init resnet18;
- hard: synthetic features with overlapping, low-rank, non-negative (ReLU-like) class structure,
  so accuracy is well below 100 % and the solver has to work.

Methods, each in its own process (seconds, peak RSS, validation accuracy):
- ours: ``fit-head --clf logreg`` (C from 1e-6 ... 1e4 along a warm-started path, coarse to fine);
- script: ``StandardScaler`` + ``LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=3 stratified
  folds, max_iter=3000, n_jobs=cores)`` — the 20-line script (a narrower grid than ours);
- grid: one linear head against ten (ten learning rates) trained in one read, 20 epochs each;
- knn: our ``--clf knn`` (k=20, T=0.07) against the same vote computed by brute force in numpy.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import PEAK_RSS_SOURCE, hard_features  # noqa: E402

CHILD_PRELUDE = (
    "import json, os, resource, sys, time; sys.path.insert(0, %r)\n"
    "import numpy as np\n"
    "from pipeline.heads.fit import _load_split, read_embeddings as _read\n"
    "def rows(cache):\n"
    "    table, split, _ = _load_split(cache, 0.2, 0)\n"
    "    dim = int(table.meta['embed_dim'])\n"
    "    tr, va = np.flatnonzero(split == 'train'), np.flatnonzero(split == 'val')\n"
    "    return _read(table, table.index_rows[tr], dim), table.labels[tr], _read(table, table.index_rows[va], dim), table.labels[va]\n"
    "def done(result, t0):\n"
    "    result.update(seconds=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib())\n"
    "    print(json.dumps(result))\n"
) % str(ROOT) + PEAK_RSS_SOURCE

METHODS = {
    "ours logreg": (
        "from pipeline.heads import fit_head\n"
        "t0 = time.perf_counter(); r = fit_head(CACHE, 'logreg', CACHE + '.logreg.pt', plots=False)\n"
        "sel = r.metrics.get('selection', {})\n"
        "done({'accuracy': r.metrics['val']['accuracy'], 'C': sel.get('C'), 'searched': len(sel.get('path', []))}, t0)\n"
    ),
    "script LogisticRegressionCV": (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from sklearn.linear_model import LogisticRegressionCV\n"
        "from sklearn.model_selection import StratifiedKFold\n"
        "from sklearn.preprocessing import StandardScaler\n"
        "t0 = time.perf_counter(); Xtr, ytr, Xva, yva = rows(CACHE)\n"
        "sc = StandardScaler().fit(Xtr)\n"
        "clf = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=StratifiedKFold(3, shuffle=True, random_state=0), max_iter=3000,\n"
        "                           n_jobs=os.cpu_count()).fit(sc.transform(Xtr), ytr)\n"
        "done({'accuracy': float(clf.score(sc.transform(Xva), yva)), 'C': float(clf.C_[0]), 'searched': 7}, t0)\n"
    ),
    "ours linear x1": (
        "from pipeline.heads import fit_head\n"
        "t0 = time.perf_counter(); r = fit_head(CACHE, 'linear', CACHE + '.lin1.pt', plots=False, epochs=20, patience=0)\n"
        "done({'accuracy': r.metrics['val']['accuracy']}, t0)\n"
    ),
    "ours linear x10 one read": (
        "from pipeline.heads import fit_head\n"
        "t0 = time.perf_counter(); r = fit_head(CACHE, 'linear', CACHE + '.lin10.pt', plots=False, epochs=20, patience=0,\n"
        "                                      lr=tuple(np.logspace(-4, -1, 10)))\n"
        "done({'accuracy': r.metrics['val']['accuracy']}, t0)\n"
    ),
    "ours knn (k=20)": (
        "from pipeline.heads import fit_head\n"
        "t0 = time.perf_counter(); r = fit_head(CACHE, 'knn', CACHE + '.knn.pt', plots=False)\n"
        "done({'accuracy': r.metrics['val']['accuracy']}, t0)\n"
    ),
    "numpy brute-force knn": (
        "t0 = time.perf_counter(); Xtr, ytr, Xva, yva = rows(CACHE)\n"
        "tr = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True); q = Xva / np.linalg.norm(Xva, axis=1, keepdims=True)\n"
        "pred = []\n"
        "for i in range(0, len(q), 1024):\n"
        "    sim = q[i:i + 1024] @ tr.T; idx = np.argpartition(-sim, 20, axis=1)[:, :20]\n"
        "    w = np.exp(np.take_along_axis(sim, idx, 1) / 0.07); votes = np.zeros((len(sim), int(ytr.max()) + 1))\n"
        "    for j in range(len(sim)): np.add.at(votes[j], ytr[idx[j]], w[j])\n"
        "    pred.append(votes.argmax(1))\n"
        "done({'accuracy': float((np.concatenate(pred) == yva).mean())}, t0)\n"
    ),
}


def run_child(method: str, cache: Path) -> dict:
    code = CHILD_PRELUDE + f"CACHE = {str(cache)!r}\n" + METHODS[method]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases


def write_cache(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    from pipeline.store import CacheWriter, PendingRow

    classes = int(y.max()) + 1
    meta = {"model": "synthetic", "weights": "none", "preprocessing": {}, "embed_dim": X.shape[1], "dtype": "float32",
            "data_root": "/synthetic", "layout": "imagefolder", "classes": [f"c{i:03d}" for i in range(classes)]}
    writer = CacheWriter(path, meta)
    for s in range(0, len(y), 10_000):
        writer.add([PendingRow(f"c{int(label):03d}/{s + i}.jpg", int(label), "", 1, 1, "") for i, label in enumerate(y[s : s + 10_000])],
                   X[s : s + 10_000])
        writer.commit()


def photo_like(root: Path, per_class: int, size: int = 96, classes: int = 10, seed: int = 0) -> Path:
    """Generated photo-like JPEGs: each class a colour palette, a texture and a shape, with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        palette = rng.uniform(0, 255, (2, 3))
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):  # classes overlap: jittered palettes, neighbouring frequencies, any angle
            angle, freq = rng.uniform(0, np.pi), 3 + 0.6 * c + rng.uniform(-1.5, 1.5)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6))
            colours = np.clip(palette + rng.normal(0, 70, palette.shape), 0, 255)
            img = colours[0] * t[..., None] + colours[1] * (1 - t[..., None])
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
            img[blob] = 255 - img[blob] * (0.5 + 0.1 * (c % 5))
            img += rng.normal(0, 40, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def extract(data: Path, cache: Path) -> None:
    from pipeline.extract import run_extract

    run_extract(data, "resnet18", "none", cache, batch_size=64)


def make_case(name: str, tmp: Path, quick: bool) -> Path:
    cache = tmp / f"{name}.h5"
    if name == "hard":
        rows, dim, classes = (3_000, 256, 20) if quick else (50_000, 2_048, 100)
        write_cache(cache, *hard_features(rows, dim, classes))
    elif name == "digits":
        from pipeline.demo import write_digits

        data = write_digits(tmp / "digits")
        if quick:  # a few per class: proves the path runs
            for folder in data.iterdir():
                for extra in sorted(folder.iterdir())[12:]:
                    extra.unlink()
        extract(data, cache)
    elif name == "photos":
        extract(photo_like(tmp / "photos", 6 if quick else 150), cache)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="digits,photos,hard", help="comma-separated: digits, photos, hard")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="small versions of every case (CI)")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"{os.cpu_count()} cores; each method in its own process, one after the other")
    table, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            t0 = time.perf_counter()
            cache = make_case(case, Path(tmp), args.quick)
            from pipeline import read_cache_meta

            meta = read_cache_meta(cache)
            print(f"\n[{case}] cache {cache.name}: {meta['embed_dim']}-d, {len(meta['classes'])} classes ({time.perf_counter() - t0:.0f}s to make)")
            results = {m: run_child(m, cache) for m in methods}
            print(f"  {'method':<30} {'seconds':>8} {'peak MiB':>9} {'val acc':>8}  notes")
            for m, r in results.items():
                if "error" in r:
                    print(f"  {m:<30} failed: {r['error']}")
                    failed.append(f"{case}: {m}")
                    continue
                notes = f"C={r['C']:g} of {r['searched']} values searched" if r.get("C") else ""
                print(f"  {m:<30} {r['seconds']:8.1f} {r['peak_rss_mib']:9.0f} {r['accuracy']:8.4f}  {notes}")
            ours, script = results.get("ours logreg", {}), results.get("script LogisticRegressionCV", {})
            if "seconds" in ours and "seconds" in script:
                ratio, gap = ours["seconds"] / script["seconds"], 100 * (ours["accuracy"] - script["accuracy"])
                print(f"  ratio ours / script time = {ratio:.2f}  (goal <= 0.5, hard <= 0.2); accuracy {gap:+.1f} points (goal >= -0.5)")
                table.append((case, ratio, gap))
            one, ten = results.get("ours linear x1", {}), results.get("ours linear x10 one read", {})
            if "seconds" in one and "seconds" in ten:
                print(f"  ratio 10 heads in one read / 1 head = {ten['seconds'] / one['seconds']:.2f}  (goal <= 2; 20 epochs each, no early stop)")
            knn, brute = results.get("ours knn (k=20)", {}), results.get("numpy brute-force knn", {})
            if "seconds" in knn and "seconds" in brute:
                print(f"  ratio knn / brute-force time = {knn['seconds'] / brute['seconds']:.2f}; accuracy {100 * (knn['accuracy'] - brute['accuracy']):+.2f} points")
    if table:
        print("\nsummary: " + "; ".join(f"{c} {r:.2f}x time, {g:+.1f} pts" for c, r, g in table))
    if failed:  # a comparison that did not run is a broken bench, not a result (CI runs --quick)
        raise SystemExit(f"{len(failed)} method(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
