"""Extraction with 1 process and with 2 torchrun processes, side by side in one run.

    python bench/scale.py                   # resnet18, 192 generated 500x375 JPEGs
    python bench/scale.py --quick           # tiny run that only proves the bench works (CI)
    python bench/scale.py --nproc 4 --device cuda   # on a machine with GPUs: one process per GPU

Each variant extracts the same images into a fresh cache through the real CLI
(`cli.py extract --json`, `torchrun --standalone --nproc_per_node=N cli.py extract`),
and the bench checks that both caches hold the same rows. On a 2-core CPU no speed-up is
expected (the two processes share the cores): the figure proves the mechanics, and the
ratio shows what the coordination costs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import make_jpegs, run_json  # noqa: E402

from pipeline import load_cache  # noqa: E402


def extract(data: Path, out: Path, model: str, batch: int, device: str, nproc: int) -> dict:
    args = [str(ROOT / "cli.py"), "extract", str(data), "-m", model, "-w", "none", "--batch-size", str(batch), "--device", device,
            "--out", str(out), "--json"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
        threads = max(1, (os.cpu_count() or 2) // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    else:
        cmd, env = [sys.executable, *args], dict(os.environ)
    return run_json(cmd, env=env, cwd=ROOT)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.batch_size = 16, 4
        args.data = args.data.with_name(args.data.name + "-quick")
    data = make_jpegs(args.data, args.images)
    results = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "device": args.device, "cores": os.cpu_count(),
               "gpus": torch.cuda.device_count()}
    with tempfile.TemporaryDirectory() as tmp:
        one = extract(data, Path(tmp) / "one.h5", args.model, args.batch_size, args.device, 1)
        many = extract(data, Path(tmp) / "many.h5", args.model, args.batch_size, args.device, args.nproc)
        a, b = load_cache(Path(tmp) / "one.h5"), load_cache(Path(tmp) / "many.h5")
        same = list(a.paths) == list(b.paths) and bool(np.allclose(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-5))
    results["one_process_img_s"] = one["images_per_s"]
    results[f"{args.nproc}_processes_img_s"] = many["images_per_s"]
    results["ratio"] = many["images_per_s"] / one["images_per_s"]
    results["identical_cache"] = same
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.model} extract, {args.images} JPEGs 500x375, batch {args.batch_size} per process, {args.device}, "
          f"{results['cores']} cores, {results['gpus']} GPU(s), torch {torch.__version__}")
    print(f"  1 process             : {one['images_per_s']:7.2f} img/s")
    print(f"  {args.nproc} torchrun processes : {many['images_per_s']:7.2f} img/s")
    print(f"  ratio {args.nproc}/1 = {results['ratio']:.2f}   same rows and embeddings: {same}")
    if not same:
        raise SystemExit("the caches differ")


if __name__ == "__main__":
    main()
