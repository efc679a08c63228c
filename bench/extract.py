"""Stage 1 throughput, measured side by side in one run on this machine.

    python bench/extract.py                 # resnet50, 512 generated 500x375 JPEGs
    python bench/extract.py --quick         # tiny run that only proves the bench works (CI)

(a) the backbone alone on random tensors (the ceiling: our model setup, no I/O),
(b) our full `extract` (scan, decode in workers, backbone, HDF5 commits),
(c) the classic tutorials' loop: ImageFolder + DataLoader(num_workers=0) + fp32 NCHW model.
Prints images/s for each and the ratios b/a and b/c (goals on 2 cores: >= 0.85 and >= 1.3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_jpegs  # noqa: E402
from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.extract import embed_batch, prepare_model, run_extract  # noqa: E402


def bench_backbone_alone(model_name: str, n: int, batch: int) -> float:
    bb = load_backbone(model_name, "none")
    net = prepare_model(bb, torch.device("cpu"))
    size = bb.preprocessing.input_size
    x = torch.randn(batch, 3, size, size)
    embed_batch(net, x, torch.device("cpu"))  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        embed_batch(net, x, torch.device("cpu"))
        done += batch
    return done / (time.perf_counter() - t0)


def bench_ours(data: Path, model_name: str, batch: int, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        s = run_extract(data, model_name, "none", Path(tmp) / "c.h5", batch_size=batch, workers=workers)
        return s.new / s.seconds


def bench_naive(data: Path, model_name: str, batch: int) -> float:
    """As in the classic transfer-learning tutorials."""
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    ds = torchvision.datasets.ImageFolder(str(data), transform=weights.transforms())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    torch.manual_seed(0)
    net = torchvision.models.get_model(model_name, weights=None).eval()
    t0 = time.perf_counter()
    done = 0
    with torch.no_grad():
        for x, _ in loader:
            net(x)
            done += len(x)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decoder processes for ours (default: the library's)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.images, args.batch_size = "resnet18", 16, 8
        args.data = args.data.with_name(args.data.name + "-quick")
    data = make_jpegs(args.data, args.images)
    results = {
        "model": args.model, "images": args.images, "batch_size": args.batch_size,
        "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
    }
    results["a_backbone_alone"] = bench_backbone_alone(args.model, args.images, args.batch_size)
    results["b_ours"] = bench_ours(data, args.model, args.batch_size, args.workers)
    results["c_naive"] = bench_naive(data, args.model, args.batch_size)
    results["ratio_b_over_a"] = results["b_ours"] / results["a_backbone_alone"]
    results["ratio_b_over_c"] = results["b_ours"] / results["c_naive"]
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.model}, {args.images} JPEGs 500x375, batch {args.batch_size}, {results['cores']} cores, torch {torch.__version__} ({results['cpu']})")
    print(f"  (a) backbone alone, random tensors : {results['a_backbone_alone']:7.2f} img/s")
    print(f"  (b) featcache extract, end to end  : {results['b_ours']:7.2f} img/s")
    print(f"  (c) tutorial loop (NCHW, 0 workers): {results['c_naive']:7.2f} img/s")
    print(f"  b/a = {results['ratio_b_over_a']:.2f}   (goal >= 0.85)")
    print(f"  b/c = {results['ratio_b_over_c']:.2f}   (goal >= 1.3)")


if __name__ == "__main__":
    main()
