"""Stage 3 training throughput and peak memory, side by side in one run on this machine.

    python bench/finetune.py                # resnet50, 128 generated 500x375 JPEGs, batch 16
    python bench/finetune.py --quick        # tiny run that only proves the bench works (CI)

(a) our training step: `pipeline.finetune.Trainer` on `AugmentedDataset` batches from
    decoder workers, channels_last, BatchNorm frozen (eval mode, no gradients);
(a') where the hardware runs bf16 natively (AMX, AVX-512 BF16, CUDA >= 8.0): the same with
    `--precision auto` (bf16 autocast; weights and optimiser state stay fp32);
(b) the classic tutorial loop: ImageFolder + DataLoader(num_workers=0) + fp32 NCHW,
    `model.train()` on everything, SGD over all parameters.
Both see the same images, batch size, augmentation (RandomResizedCrop + flip) and
optimiser (SGD, momentum 0.9); the first batch is a warm-up and is not timed. Each runs
in its own process so its peak RSS (and peak CUDA memory on a GPU) is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_jpegs, run_json  # noqa: E402


def _timed(batches, step, dev: torch.device) -> tuple[int, float]:
    """Images and seconds over all batches but the first (warm-up)."""
    done, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            t0 = time.perf_counter()
        else:
            done += len(y)
    return done, time.perf_counter() - (t0 or time.perf_counter())


def run_ours(data: Path, model: str, batch: int, device: str, precision: str = "fp32") -> dict:
    from pipeline.backbones.registry import load_backbone
    from pipeline.finetune.augment import AugmentedDataset, epoch_order, train_transform
    from pipeline.finetune.model import assemble
    from pipeline.finetune.options import resolve_options
    from pipeline.finetune.trainer import Trainer
    from pipeline.heads.estimators import build_head_module
    from pipeline.images.folders import scan_folder
    from pipeline.images.reader import default_workers, make_loader

    dev = torch.device(device)
    scan = scan_folder(data)
    bb = load_backbone(model, "none", seed=0)
    net, _, _ = assemble(bb, build_head_module(bb.embed_dim, len(scan.classes), (), ()), "all", len(scan.classes), seed=0)
    net.to(dev).to(memory_format=torch.channels_last)
    opts = resolve_options({"epochs": 1, "batch_size": batch, "amp": dev.type == "cuda" and precision == "fp32", "precision": precision})
    labels = np.array([r.label for r in scan.records])
    trainer = Trainer(net, opts, dev, labels)
    ds = AugmentedDataset(scan.root, scan.records, train_transform(bb.preprocessing, "basic"), seed=0)
    loader = make_loader(ds, batch, default_workers(dev.type), dev.type == "cuda", sampler=epoch_order(len(ds), 0, 0))
    marks: dict[str, float] = {}

    def progress(done_batches: int, total: int, elapsed: float) -> None:  # timing starts after the warm-up batch
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks["t0" if done_batches == 1 else "end"] = time.perf_counter()

    stats = trainer.train_epoch(loader, 0, 1, progress)
    return {"images": stats.images - min(batch, stats.images), "seconds": marks["end"] - marks["t0"]}


def run_tutorial(data: Path, model: str, batch: int, device: str) -> dict:
    """As in the classic transfer-learning tutorials."""
    dev = torch.device(device)
    weights = torchvision.models.get_model_weights(model).DEFAULT
    pre = weights.transforms()
    tf = torchvision.transforms.Compose([
        torchvision.transforms.RandomResizedCrop(pre.crop_size[0]), torchvision.transforms.RandomHorizontalFlip(),
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(pre.mean, pre.std),
    ])
    ds = torchvision.datasets.ImageFolder(str(data), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    net = torchvision.models.get_model(model, weights=None)
    from pipeline.backbones.registry import _set_submodule, find_classifier

    name, layer = find_classifier(net, 1000)
    _set_submodule(net, name, torch.nn.Linear(layer.in_features, len(ds.classes)))
    net.to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x, y = x.to(dev), y.to(dev)
        opt.zero_grad()
        out = net(x)
        out = out[0] if isinstance(out, tuple) else out
        crit(out, y).backward()
        opt.step()

    done, seconds = _timed(loader, step, dev)
    return {"images": done, "seconds": seconds}


def child(variant: str, data: Path, model: str, batch: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_tutorial(data, model, batch, device) if variant == "tutorial" else run_ours(data, model, batch, device, "auto" if variant == "ours-auto" else "fp32")
    if device == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def measure(variant: str, args) -> dict:
    """Run one variant in a fresh process; its peak RSS comes from wait4."""
    result, usage = run_json([sys.executable, __file__, "--child", variant, "--data", str(args.data), "--model", args.model,
                              "--batch-size", str(args.batch_size), "--device", args.device])
    result["images_per_s"] = result["images"] / result["seconds"]
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["ours", "ours-auto", "tutorial"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.model, args.batch_size, args.device)
        return
    if args.quick:
        args.model, args.images, args.batch_size = "resnet18", 24, 8
        args.data = args.data.with_name(args.data.name + "-quick")
    make_jpegs(args.data, args.images)
    results = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "device": args.device,
               "cpu": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()}
    results["a_ours"] = measure("ours", args)
    from pipeline.backbones.hardware import choose_precision

    if choose_precision("auto", torch.device(args.device)).name == "bf16":
        results["a_ours_bf16"] = measure("ours-auto", args)
    results["b_tutorial"] = measure("tutorial", args)
    results["speed_ratio_a_over_b"] = results["a_ours"]["images_per_s"] / results["b_tutorial"]["images_per_s"]
    if "a_ours_bf16" in results:
        results["speed_ratio_bf16_over_b"] = results["a_ours_bf16"]["images_per_s"] / results["b_tutorial"]["images_per_s"]
    results["memory_ratio_a_over_b"] = results["a_ours"]["peak_rss_mib"] / results["b_tutorial"]["peak_rss_mib"]
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.model} fine-tuning, {args.images} JPEGs 500x375, batch {args.batch_size}, {args.device}, {results['cores']} cores, "
          f"torch {torch.__version__} ({results['cpu']})")
    for key, label in (("a_ours", "(a) featcache Trainer (workers, channels_last, BN frozen)"), ("a_ours_bf16", "(a') the same, --precision auto (bf16)"),
                       ("b_tutorial", "(b) tutorial loop (NCHW, 0 workers, BN training)")):
        r = results.get(key)
        if r is None:
            continue
        extra = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else ""
        print(f"  {label}: {r['images_per_s']:6.2f} img/s, peak RSS {r['peak_rss_mib']:.0f} MiB{extra}")
    print(f"  a/b speed = {results['speed_ratio_a_over_b']:.2f}   a/b peak RSS = {results['memory_ratio_a_over_b']:.2f}"
          + (f"   a'/b speed = {results['speed_ratio_bf16_over_b']:.2f}" if "speed_ratio_bf16_over_b" in results else ""))


if __name__ == "__main__":
    main()
