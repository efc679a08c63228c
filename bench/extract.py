"""Stage 1 throughput: every engine alone and end to end, side by side in one run on this machine.

    python bench/extract.py                 # resnet50, 512 generated 500x375 JPEGs
    python bench/extract.py --quick         # tiny run that only proves the bench works (CI)
    python bench/extract.py --json          # one JSON object

Measured here, in this order:
  engines alone on random tensors (no I/O): eager fp32 NCHW (the tutorials), eager fp32
  channels_last, torch.compile fp32 (checked against eager), and where the hardware runs
  bf16 natively the same in bf16; ONNX Runtime / OpenVINO as peers when installed;
  decode + transforms alone (one core);
  the classic tutorials' loop end to end (ImageFolder, num_workers=0, fp32 NCHW);
  our `extract` end to end in exact fp32 (engine auto) and in bf16 where native.
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
from typing import Callable

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_jpegs  # noqa: E402
from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.engines import Engine, build_engine  # noqa: E402
from pipeline.extract import prepare_model, run_extract  # noqa: E402
from pipeline.hardware import PrecisionChoice, cpu_flags, cpu_summary, native_bf16  # noqa: E402

CPU = torch.device("cpu")
FP32 = PrecisionChoice("fp32", None, "")
BF16 = PrecisionChoice("bf16", torch.bfloat16, "")


def rate(step: Callable[[], None], n: int, batch: int) -> float:
    step()  # warm-up (and, for compiled engines, the compilation) is not timed
    t0 = time.perf_counter()
    done = 0
    while done < n:
        step()
        done += batch
    return done / (time.perf_counter() - t0)


def engines_alone(model_name: str, n: int, batch: int, compile_dir: Path, bf16: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    bb = load_backbone(model_name, "none")
    size = bb.preprocessing.input_size
    x = torch.randn(batch, 3, size, size)
    nchw = bb.model.eval()
    out["eager_fp32_nchw"] = rate(lambda: Engine("eager", nchw, FP32, CPU, False, batch).embed(x), n, batch)
    cl = prepare_model(bb, CPU)
    out["eager_fp32"] = rate(lambda: Engine("eager", cl, FP32, CPU, True, batch).embed(x), n, batch)
    precisions = [("fp32", FP32)] + ([("bf16", BF16)] if bf16 else [])
    if bf16:
        out["eager_bf16"] = rate(lambda: Engine("eager", cl, BF16, CPU, True, batch).embed(x), n, batch)
    for name, prec in precisions:
        eng = build_engine("compile", cl, CPU, prec, batch, size, n, compile_dir)
        out[f"compile_{name}"] = rate(lambda: eng.embed(x), n, batch) if eng.name == "compile" else None
    out.update(peers(nchw, x, n, batch))
    return out


def peers(model: torch.nn.Module, x: torch.Tensor, n: int, batch: int) -> dict[str, float | None]:
    """ONNX Runtime and OpenVINO on CPU, fp32, when installed (`pip install onnxruntime openvino`)."""
    out: dict[str, float | None] = {"onnxruntime_fp32": None, "openvino_fp32": None}
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            xn = x.numpy()
            out["onnxruntime_fp32"] = rate(lambda: sess.run(None, {"x": xn}), n, batch)
    try:
        import openvino as ov
    except ImportError:
        ov = None
    if ov is not None:
        compiled = ov.compile_model(ov.convert_model(model, example_input=x), "CPU")
        xn = x.numpy()
        out["openvino_fp32"] = rate(lambda: compiled(xn), n, batch)
    return out


def decode_alone(data: Path, model_name: str, n: int) -> float:
    from pipeline.data import scan_folder
    from pipeline.extract import ImageFileDataset

    bb = load_backbone(model_name, "none")
    ds = ImageFileDataset(data, scan_folder(data).records[:n], bb.preprocessing.transform())
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t0)


def naive(data: Path, model_name: str, batch: int) -> float:
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


def ours(data: Path, model_name: str, batch: int, cache_dir: Path, precision: str) -> dict:
    s = run_extract(data, model_name, "none", cache_dir / f"ours_{precision}.h5", batch_size=batch, precision=precision)
    return {"img_s": s.new / s.seconds, "engine": s.engine, "precision": s.precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.images, args.batch_size = "resnet18", 16, 8
        args.data = args.data.with_name(args.data.name + "-quick")
    data = make_jpegs(args.data, args.images)
    bf16_ok, bf16_why = native_bf16(CPU)
    n_alone = max(args.batch_size, args.images // 4)
    r: dict = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": str(torch.__version__), "cpu": cpu_summary(),
               "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4"))), "bf16_native": bf16_ok, "bf16_why": bf16_why}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        # the engines share the compile cache with `ours` (as consecutive cron runs do)
        r["engines"] = engines_alone(args.model, n_alone, args.batch_size, cache_dir, bf16_ok)
        r["decode_transform_one_core"] = decode_alone(data, args.model, min(args.images, 64))
        r["naive"] = naive(data, args.model, args.batch_size)
        fp32 = ours(data, args.model, args.batch_size, cache_dir, "fp32")
        r["ours_fp32"], r["ours_fp32_engine"] = fp32["img_s"], fp32["engine"]
        r["ours_bf16"] = ours(data, args.model, args.batch_size, cache_dir, "bf16")["img_s"] if bf16_ok else None
    best = lambda names: max((v for k, v in r["engines"].items() if v and any(k.endswith(n) for n in names)), default=None)  # noqa: E731
    best_fp32, best_bf16 = best(["fp32", "fp32_nchw"]), best(["bf16"])
    r["ratio_fp32_vs_best_fp32_engine"] = r["ours_fp32"] / best_fp32 if best_fp32 else None
    r["ratio_bf16_vs_best_bf16_engine"] = r["ours_bf16"] / best_bf16 if best_bf16 and r["ours_bf16"] else None
    r["ratio_vs_naive"] = r["ours_fp32"] / r["naive"]
    if args.json:
        print(json.dumps(r))
        return
    fmt = lambda v: f"{v:8.2f}" if v else "     n/a"  # noqa: E731
    print(f"{args.model}, {args.images} JPEGs 500x375, batch {args.batch_size}, {r['cores']} cores, torch {r['torch']}")
    print(f"CPU: {r['cpu']['capability']}; flags {' '.join(r['cpu_flags'])}; bf16 native: {bf16_ok} ({bf16_why})")
    print("engines alone, random tensors (img/s):")
    for name, value in r["engines"].items():
        print(f"  {name:<22}{fmt(value)}")
    print(f"decode + transforms, one core : {fmt(r['decode_transform_one_core'])}")
    print(f"naive tutorial loop, end to end: {fmt(r['naive'])}")
    print(f"ours fp32 ({r['ours_fp32_engine']}), end to end : {fmt(r['ours_fp32'])}")
    print(f"ours bf16, end to end          : {fmt(r['ours_bf16'])}")
    ratio = lambda v: f"{v:.2f}" if v else "n/a"  # noqa: E731
    print(f"ours fp32 / best fp32 engine = {ratio(r['ratio_fp32_vs_best_fp32_engine'])}  (goal >= 0.85)")
    print(f"ours bf16 / best bf16 engine = {ratio(r['ratio_bf16_vs_best_bf16_engine'])}  (goal >= 0.7)")
    print(f"ours fp32 / naive            = {ratio(r['ratio_vs_naive'])}  (goal >= 2.4 with AVX-512)")


if __name__ == "__main__":
    main()
