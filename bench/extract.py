"""Stage 1 throughput: every engine alone and end to end, side by side in one run on this machine.

    python bench/extract.py                 # resnet50, 512 generated 500x375 JPEGs
    python bench/extract.py --quick         # tiny run that only proves the bench works (CI)
    python bench/extract.py --json          # one JSON object
    python bench/extract.py --model timm:convnext_tiny   # a timm model: the reference loop is timm's own
    python bench/extract.py --source shards # the same images from a folder and from WebDataset tar shards
    pip install -e '.[engines]'             # adds ONNX Runtime and OpenVINO (measured when installed)

Measured here, in this order:
  engines alone on random tensors (no I/O): eager fp32 NCHW (the tutorials), then every
  engine `extract --engine auto` chooses from — eager channels_last, torch.compile, ONNX
  Runtime, OpenVINO (each checked against eager) — in fp32 and, where the hardware runs
  bf16 natively, in bf16. This is `featcache engines`: it remembers the fastest in the
  bench's cache folder, as a first cron run would;
  decode + transforms alone (one core), and on 12 MP photos exact vs `--decode draft`;
  the classic tutorials' loop end to end (ImageFolder, num_workers=0, fp32 NCHW);
  our `extract` end to end (engine auto) in exact fp32 and in bf16 where native, and the
  data path: fp32 with 0, 1 and 2 decoder processes (the default is chosen from these).
Goals on 2 cores: ours fp32 >= 0.85 x the best fp32 engine alone, ours bf16 >= 0.7 x the
best bf16 engine alone, ours fp32 >= 2.4 x the naive loop where the CPU has AVX-512.
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
from extract_gpu import add_arguments as add_gpu_arguments  # noqa: E402
from extract_gpu import gpu_main  # noqa: E402

from pipeline.backbones.engines import TorchEngine, measure, tune  # noqa: E402
from pipeline.backbones.hardware import PrecisionChoice, cpu_flags, cpu_summary, native_bf16  # noqa: E402
from pipeline.backbones.registry import load_backbone  # noqa: E402
from pipeline.devices import resolve_device  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.images.reader import default_workers  # noqa: E402
from pipeline.inference import engine_context  # noqa: E402

FP32 = PrecisionChoice("fp32", None, "")


def engines_alone(model_name: str, batch: int, cache_dir: Path, device: torch.device, bf16: bool, seconds: float) -> tuple[dict, dict]:
    """{engine_precision: img/s or None}, {engine_precision: why skipped}; the choices are remembered in cache_dir."""
    bb = load_backbone(model_name, "none")
    size = bb.preprocessing.input_size
    x = torch.randn(batch, 3, size, size)
    rates: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    if device.type == "cpu":
        nchw = bb.model.eval()
        rates["eager_fp32_nchw"] = measure(TorchEngine("eager", nchw, FP32, device, False, batch), x, seconds)
    precisions = [FP32] + ([PrecisionChoice("bf16", torch.bfloat16, "")] if bf16 else [])
    for precision in precisions:
        ctx = engine_context(bb, device, precision, batch, cache_dir)
        t0 = time.perf_counter()
        tuning = tune(ctx, min_seconds=seconds)
        rates[f"tuning_seconds_{precision.name}"] = round(time.perf_counter() - t0, 1)
        for name, value in tuning.rates.items():
            rates[f"{name}_{precision.name}"] = value
            if name in tuning.reasons:
                skipped[f"{name}_{precision.name}"] = tuning.reasons[name]
    return rates, skipped


def decode_alone(data: Path, model_name: str, n: int, draft: bool = False) -> float:
    """Images/s of read + decode + transforms on one core (after a few warm-up images)."""
    from pipeline.images.folders import scan_folder
    from pipeline.images.reader import ImageFileDataset

    bb = load_backbone(model_name, "none")
    records = scan_folder(data).records[:n]
    ds = ImageFileDataset(data, records, bb.preprocessing.transform(), draft_size=bb.preprocessing.draft_size if draft else None)
    for i in range(min(4, len(ds))):
        ds[i]
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t0)


def naive(data: Path, model_name: str, batch: int, device: torch.device) -> float:
    """As in the classic transfer-learning tutorials; for ``timm:`` models, timm's own inference
    loop (ImageFolder + the model's data-config transform + the eager model, as its docs show)."""
    torch.manual_seed(0)
    if model_name.startswith("timm:"):
        import timm

        net = timm.create_model(model_name[len("timm:"):], pretrained=False, num_classes=0).eval().to(device)
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(net))
    else:
        transform = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
        net = torchvision.models.get_model(model_name, weights=None).eval().to(device)
    ds = torchvision.datasets.ImageFolder(str(data), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    done = 0
    with torch.no_grad():
        for x, _ in loader:
            net(x.to(device)).cpu()
            done += len(x)
    return done / (time.perf_counter() - t0)


def ours(data: Path, model_name: str, batch: int, cache_dir: Path, precision: str, device: str, workers: int | None = None, name: str = "",
         decode: str = "exact") -> dict:
    s = run_extract(data, model_name, "none", cache_dir / f"ours_{precision}_{decode}_{name or workers}.h5", batch_size=batch, precision=precision,
                    device=device, workers=workers, decode=decode)
    return {"img_s": s.new / s.seconds, "engine": s.engine, "precision": s.precision}


def write_shards(folder: Path, out_dir: Path, per_shard: int = 256) -> str:
    """The folder's images as WebDataset shards (KEY.jpg + KEY.txt class name); returns the pattern."""
    import io
    import tarfile

    from pipeline.images.folders import scan_folder

    scan = scan_folder(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = (len(scan.records) + per_shard - 1) // per_shard
    for s in range(n):
        path = out_dir / f"shard-{s:06d}.tar"
        if path.exists():
            continue
        with tarfile.open(path.with_suffix(".tmp"), "w") as tar:
            for r in scan.records[s * per_shard:(s + 1) * per_shard]:
                key = r.relpath.rsplit(".", 1)[0].replace("/", "_")
                tar.add(folder / r.relpath, arcname=f"{key}.jpg")
                info = tarfile.TarInfo(f"{key}.txt")
                label = scan.classes[r.label].encode()
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
        path.with_suffix(".tmp").rename(path)
    return str(out_dir / f"shard-{{{0:06d}..{n - 1:06d}}}.tar")


def sources(args: argparse.Namespace) -> None:
    """Folder vs tar shards of the same images, ours end to end (wall clock, scan included), alternating, best of 3 each."""
    device = resolve_device(args.device)
    size = (64, 48) if args.small else (500, 375)
    data = make_jpegs(args.data.with_name(args.data.name + ("-small" if args.small else "")), args.images, size=size)
    pattern = write_shards(data, data.with_name(data.name + "-shards"))
    rates: dict[str, list[float]] = {"folder": [], "shards": []}
    from pipeline.images import scan_source

    scans: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in (("folder", data), ("shards", pattern)):  # the scan alone (shards: from the member index once written)
            scan_source(source, shard_index=Path(tmp) / "index")
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                scan_source(source, shard_index=Path(tmp) / "index")
                times.append(time.perf_counter() - t0)
            scans[name] = min(times)
        from pipeline.images.reader import read_record

        reads: dict[str, float] = {}
        for name, source in (("folder", data), ("shards", pattern)):  # reading the bytes alone, per image
            scan = scan_source(source, shard_index=Path(tmp) / "index")
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for rec in scan.records:
                    read_record(scan.root, rec)
                times.append((time.perf_counter() - t0) / len(scan.records))
            reads[name] = min(times)
        for attempt in range(3):
            for name, source in (("folder", data), ("shards", pattern)):
                t0 = time.perf_counter()  # wall clock: the scan (a stat per file, or a shard index) is part of what users wait for
                s = run_extract(source, args.model, "none", Path(tmp) / f"{name}-{attempt}.h5", batch_size=args.batch_size, device=args.device,
                                engine="eager")
                rates[name].append(s.new / (time.perf_counter() - t0))
    r = {"model": args.model, "images": args.images, "size": list(size), "device": str(device), "workers": default_workers(device.type),
         "folder_img_s": max(rates["folder"]), "shards_img_s": max(rates["shards"]), "scan_seconds": scans, "read_seconds_per_image": reads}
    r["ratio_shards_vs_folder"] = r["shards_img_s"] / r["folder_img_s"]
    if args.json:
        print(json.dumps(r))
        return
    print(f"{args.model}, {args.images} JPEGs {size[0]}x{size[1]}, batch {args.batch_size}, {r['device']}, eager, decoders {r['workers']}")
    print(f"  folder      : {r['folder_img_s']:8.2f} img/s   (scan alone {scans['folder'] * 1000:.1f} ms: a stat per file)")
    print(f"  tar shards  : {r['shards_img_s']:8.2f} img/s   (scan alone {scans['shards'] * 1000:.1f} ms: member index, shards not opened)")
    print(f"  reading the bytes alone: folder {reads['folder'] * 1e6:.1f} us/img, shards {reads['shards'] * 1e6:.1f} us/img (one pread, shard kept open)")
    print(f"shards / folder = {r['ratio_shards_vs_folder']:.2f}  (goal >= 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="torchvision name or timm:NAME (default resnet50; --quick: resnet18)")
    ap.add_argument("--images", type=int, default=None, help="default 512 (CPU), 20000 (--device cuda)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (CPU), 256 (--device cuda)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU bench (bench/extract_gpu.py)")
    ap.add_argument("--seconds", type=float, default=4.0, help="how long each engine alone is timed")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--source", choices=("folder", "shards"), default="folder", help="shards: folder vs WebDataset tar shards of the same images")
    ap.add_argument("--small", action="store_true", help="with --source shards: many small (64x48) files instead of 500x375 photos")
    add_gpu_arguments(ap)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        args.images, args.batch_size = args.images or 20000, args.batch_size or 256
        args.model, args.big = args.model or "resnet50", 100 if args.big is None else args.big
        args.seconds = min(args.seconds, 2.0)
        if args.quick:
            args.images, args.big, args.batch_size, args.seconds, args.worker_counts, args.compile = 512, 4, 64, 0.3, [2], False
        args.data = args.data.with_name(args.data.name + f"-gpu-{args.images}")
        gpu_main(args)
        return
    args.images, args.batch_size = args.images or 512, args.batch_size or 32
    if args.source == "shards":
        args.model = args.model or "mobilenet_v3_small"  # a light model, so the data path shows
        if args.quick:
            args.images, args.batch_size = 16, 8
            args.data = args.data.with_name(args.data.name + "-quick")
        sources(args)
        return
    seconds = args.seconds
    if args.quick:
        args.model, args.images, args.batch_size, seconds = args.model or "resnet18", 16, 8, 0.2
        args.data = args.data.with_name(args.data.name + "-quick")
    args.model = args.model or "resnet50"
    device = resolve_device(args.device)
    data = make_jpegs(args.data, args.images)
    bf16_ok, bf16_why = native_bf16(device)
    r: dict = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "device": str(device), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": str(torch.__version__), "cpu": cpu_summary(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4"))), "bf16_native": bf16_ok, "bf16_why": bf16_why}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        # the engines' measurement is remembered in the folder `ours` extracts into (as a first cron run would)
        r["engines"], r["engines_skipped"] = engines_alone(args.model, args.batch_size, cache_dir, device, bf16_ok, seconds)
        r["decode_transform_one_core"] = decode_alone(data, args.model, min(args.images, 128))
        photos = make_jpegs(args.data.with_name(args.data.name + "-12mp"), 2 if args.quick else 12, size=(4000, 3000))
        r["decode_12mp_photo"] = {"exact": decode_alone(photos, args.model, 12), "draft": decode_alone(photos, args.model, 12, draft=True)}
        r["naive"] = naive(data, args.model, args.batch_size, device)
        fp32 = ours(data, args.model, args.batch_size, cache_dir, "fp32", args.device, name="default")
        r["ours_fp32"], r["ours_fp32_engine"], r["ours_workers"] = fp32["img_s"], fp32["engine"], default_workers(device.type)
        r["ours_bf16"] = ours(data, args.model, args.batch_size, cache_dir, "bf16", args.device, name="default")["img_s"] if bf16_ok else None
        if device.type == "cuda":  # opt-in nvJPEG decode (changes pixels slightly)
            r["ours_fp32_gpu_decode"] = ours(data, args.model, args.batch_size, cache_dir, "fp32", args.device, name="default", decode="gpu")["img_s"]
            r["ours_bf16_gpu_decode"] = ours(data, args.model, args.batch_size, cache_dir, "bf16", args.device, name="default", decode="gpu")["img_s"]
        r["data_path_fp32"] = {f"workers_{w}": ours(data, args.model, args.batch_size, cache_dir, "fp32", args.device, w)["img_s"]
                               for w in ([0, 1, 2] if device.type == "cpu" else [2, 4, 8])}
    rates = {k: v for k, v in r["engines"].items() if not k.startswith("tuning_")}
    best = lambda suffix: max((v for k, v in rates.items() if v and suffix in k), default=None)  # noqa: E731
    best_fp32, best_bf16 = best("_fp32"), best("_bf16")
    r["best_fp32_engine"], r["best_bf16_engine"] = best_fp32, best_bf16
    r["ratio_fp32_vs_best_fp32_engine"] = r["ours_fp32"] / best_fp32 if best_fp32 else None
    r["ratio_bf16_vs_best_bf16_engine"] = r["ours_bf16"] / best_bf16 if best_bf16 and r["ours_bf16"] else None
    r["ratio_vs_naive"] = r["ours_fp32"] / r["naive"]
    if device.type == "cuda":
        r["ratio_fp32_gpu_decode_vs_best_fp32_engine"] = r["ours_fp32_gpu_decode"] / best_fp32
        r["ratio_bf16_gpu_decode_vs_best_bf16_engine"] = r["ours_bf16_gpu_decode"] / best_bf16 if best_bf16 else None
    if args.json:
        print(json.dumps(r))
        return
    fmt = lambda v: f"{v:8.2f}" if v else "     n/a"  # noqa: E731
    print(f"{args.model}, {args.images} JPEGs 500x375, batch {args.batch_size}, {r['device']} {r['gpu'] or ''}, {r['cores']} cores, torch {r['torch']}")
    print(f"CPU: {r['cpu']['capability']}; flags {' '.join(r['cpu_flags'])}; bf16 native: {bf16_ok} ({bf16_why})")
    print("engines alone, random tensors (img/s):")
    for name, value in rates.items():
        why = r["engines_skipped"].get(name)
        print(f"  {name:<24}{fmt(value)}" + (f"   ({why})" if why else ""))
    print(f"  (measuring them took {r['engines'].get('tuning_seconds_fp32')}s fp32, {r['engines'].get('tuning_seconds_bf16', '-')}s bf16, once per machine)")
    print(f"decode + transforms, one core : {fmt(r['decode_transform_one_core'])}")
    d = r["decode_12mp_photo"]
    print(f"  12 MP photos: exact {d['exact']:.2f}, --decode draft {d['draft']:.2f} img/s ({d['draft'] / d['exact']:.1f}x; opt-in, changes pixels)")
    reference = "timm's own inference loop" if args.model.startswith("timm:") else "naive tutorial loop"
    print(f"{reference}, end to end: {fmt(r['naive'])}")
    print(f"ours fp32 ({r['ours_fp32_engine']}, {r['ours_workers']} decoder processes), end to end: {fmt(r['ours_fp32'])}")
    print(f"ours bf16, end to end          : {fmt(r['ours_bf16'])}")
    if device.type == "cuda":
        print(f"ours --decode gpu (nvJPEG), end to end: fp32 {fmt(r['ours_fp32_gpu_decode'])}, bf16 {fmt(r['ours_bf16_gpu_decode'])}")
    print("data path, ours fp32 end to end by decoder processes: " + ", ".join(f"{k.split('_')[1]}: {v:.2f}" for k, v in r["data_path_fp32"].items()))
    ratio = lambda v: f"{v:.2f}" if v else "n/a"  # noqa: E731
    print(f"ours fp32 / best fp32 engine = {ratio(r['ratio_fp32_vs_best_fp32_engine'])}  (goal >= 0.85)")
    print(f"ours bf16 / best bf16 engine = {ratio(r['ratio_bf16_vs_best_bf16_engine'])}  (goal >= 0.7)")
    print(f"ours fp32 / {'timm loop' if args.model.startswith('timm:') else 'naive    '}        = {ratio(r['ratio_vs_naive'])}  (goal >= 2.4 with AVX-512)")


if __name__ == "__main__":
    main()
