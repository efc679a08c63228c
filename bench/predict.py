"""Using a trained model, side by side in one run on this machine (issue #29).

    python bench/predict.py            # resnet50, 512 generated 500x375 JPEGs; a 100,000 x 2,048 cache
    python bench/predict.py --quick    # resnet18, 32 JPEGs, a 20,000-row cache (CI: the bench runs)
    python bench/predict.py --json     # one JSON object

Measured, in this order (the engines measured once first, as `featcache engines` does, so
`auto` picks the same engine for extract and predict):
  extract end to end on the JPEGs (img/s), a logreg head fitted on that cache;
  predict end to end on the same JPEGs (engine auto, the head's precision), and the eager
  loop predict was before it took the inference path (float transforms in-process, eager
  fp32 forward, the head) — goal: predict >= 0.9 x extract;
  predict --cache on a 100,000-row cache of 2,048-d rows (100 classes), in rows/min — goal:
  >= 1,000,000 rows/min for a logreg head on 2 cores;
  the exported ONNX model in ONNX Runtime (batch-1 latency, batch-32 img/s) against the eager
  torch model (backbone + head), when the `onnx` extra is installed;
  `serve` under a loopback load (1, 8 and 32 concurrent clients; p50/p99 latency, req/s)
  against a naive handler on the same HTTP stack (one eager forward per request), when the
  `serve` extra is installed; where the CPU runs bf16 natively (AMX, AVX-512 BF16) also
  `serve --precision auto` (bf16), with its top-1 agreement with fp32 on the JPEGs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import hard_features, make_jpegs  # noqa: E402

from pipeline.backbones import load_backbone, tune  # noqa: E402
from pipeline.backbones.hardware import PrecisionChoice, choose_precision, cpu_summary  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.heads import fit_head, full_proba, load_head  # noqa: E402
from pipeline.inference import embed_batch, engine_context, prepare_model  # noqa: E402
from pipeline.predict import PredictOptions, predict  # noqa: E402

FP32 = PrecisionChoice("fp32", None, "")


def eager_loop(head: Path, data: Path, batch: int) -> float:
    """predict as it was: float transforms in this process (no decoder processes, no uint8
    path), an eager fp32 forward, the head's predict_proba; img/s."""
    from pipeline.images import ImageFileDataset, make_loader, scan_source

    loaded = load_head(head)
    backbone = loaded.load_backbone(trust_hub=True)
    net = prepare_model(backbone, torch.device("cpu"))
    scan = scan_source(data)
    loader = make_loader(ImageFileDataset(scan.root, scan.records, backbone.preprocessing.transform(), hash_files=False), batch, 0, False)
    n_classes = len(loaded.provenance["classes"])
    t0 = time.perf_counter()
    done = 0
    for b in loader:
        if b.images is not None:
            full_proba(loaded.head, embed_batch(net, b.images, torch.device("cpu")), n_classes)
            done += len(b.images)
    return done / (time.perf_counter() - t0)


def cache_rows_per_minute(work: Path, rows: int, dim: int, repeat: int) -> dict:
    """predict --cache on a synthetic cache: rows/min of scoring (read, head, top-k, CSV)."""
    from pipeline.store import CacheWriter, new_cache_meta

    classes = [f"c{i:03d}" for i in range(100)]
    meta = new_cache_meta("synthetic", dim, classes, weights="none", seed=0, data_root="/synthetic")
    X, y = hard_features(rows, dim, len(classes), seed=0)
    big, small = work / "big.h5", work / "small.h5"
    for path, n in ((big, rows), (small, min(rows, 5000))):
        w = CacheWriter(path, meta)
        for a in range(0, n, 50_000):
            b = min(n, a + 50_000)
            w.add_columns([f"{classes[c]}/{i:08d}.jpg" for i, c in zip(range(a, b), y[a:b])], X[a:b], labels=y[a:b])
            w.commit()
        w.compact(full=True)
    head = Path(fit_head(small, "logreg", work / "synthetic.head.pt", plots=False, C=1.0).head_path)
    times = []
    for k in range(repeat):
        t0 = time.perf_counter()
        r = predict(head, options=PredictOptions(cache=str(big), out=str(work / f"cache-{k}.csv")))
        times.append(time.perf_counter() - t0)
        assert r.n == rows
    best = min(times)
    return {"rows": rows, "dim": dim, "seconds": round(best, 3), "rows_per_min": rows / best * 60}


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def onnx_side_by_side(head: Path, data: Path, work: Path, quick: bool) -> dict:
    """The exported model in ONNX Runtime against the eager torch model (backbone + head),
    batch-1 latency and batch-32 img/s, both from uint8 pixels."""
    import importlib.util

    if any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")):
        return {"skipped": "the onnx extra is not installed (pip install -e '.[onnx]')"}
    from pipeline.serving import export_model, load_classifier

    onnx_path = work / "model.onnx"
    t0 = time.perf_counter()
    export_model(head, onnx_path, {"uint8": True, "probe": (str(data),)}, trust_hub=True)
    export_s = time.perf_counter() - t0
    torch_model, onnx_model = load_classifier(head, engine="eager", trust_hub=True), load_classifier(onnx_path)
    files = sorted(data.rglob("*.jpg"))[:32]
    pixels = torch.stack([torch_model.pixels(f.read_bytes()) for f in files])
    repeat = 3 if quick else 20
    out = {"export_seconds": round(export_s, 1), "onnx_mib": round(onnx_path.stat().st_size / 2**20, 1)}
    for name, model in (("torch_eager", torch_model), ("onnxruntime", onnx_model)):
        out[f"{name}_batch1_ms"] = _median_ms(lambda: model.probabilities(pixels[:1]), repeat)
        out[f"{name}_batch32_img_s"] = len(pixels) / (_median_ms(lambda: model.probabilities(pixels), max(2, repeat // 4)) / 1000)
    out["max_abs_diff"] = float(np.abs(torch_model.probabilities(pixels) - onnx_model.probabilities(pixels)).max())
    return out


NAIVE_SERVER = """
import asyncio, io, json, sys
sys.path.insert(0, {root!r})
import torch
from fastapi import FastAPI, Request, Response
from PIL import Image
from pipeline.heads import full_proba, load_head
loaded = load_head({head!r})
backbone = loaded.load_backbone(trust_hub=True)
net, transform, classes = backbone.model.eval(), backbone.preprocessing.transform(), loaded.provenance["classes"]
app = FastAPI()

def infer(data: bytes) -> list:
    x = transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        p = full_proba(loaded.head, net(x).numpy(), len(classes))[0]
    return [{{"class": classes[i], "probability": float(p[i])}} for i in p.argsort()[::-1][:5]]

@app.post("/predict")
async def predict(request: Request):
    return {{"predictions": [{{"topk": await asyncio.to_thread(infer, await request.body())}}]}}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health" if "cli.py" in " ".join(cmd) else f"http://127.0.0.1:{port}/docs", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def load(port: int, bodies: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, ``requests`` POSTs among
    them (real JPEGs, round robin): p50/p99 latency and requests/s over the whole run."""
    import http.client
    import threading

    latencies: list[float] = []
    lock = threading.Lock()
    errors = [0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        mine = []
        for i in range(k, requests, clients):
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - t0)
            if response.status != 200:
                errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "req_s": len(lat) / wall}


def serve_side_by_side(head: Path, data: Path, work: Path, quick: bool, requests: int = 2000, bf16: bool = False) -> dict:
    """``serve`` against a naive handler on the same stack (FastAPI + uvicorn, one eager forward
    per request) under 1, 8 and 32 concurrent clients, and decode + one forward alone;
    ``bf16``: also ``serve --precision auto`` (the hardware runs bf16 natively)."""
    import importlib.util

    if any(importlib.util.find_spec(p) is None for p in ("fastapi", "uvicorn")):
        return {"skipped": "the serve extra is not installed (pip install -e '.[serve]')"}
    from pipeline.serving import load_classifier

    bodies = [f.read_bytes() for f in sorted(data.rglob("*.jpg"))[:64]]
    model = load_classifier(head, engine="eager", trust_hub=True)
    one = _median_ms(lambda: model.probabilities(model.pixels(bodies[0]).unsqueeze(0)), 5 if quick else 30)
    levels = [(1, 10), (4, 10)] if quick else [(1, requests), (8, requests), (32, requests)]
    out: dict = {"decode_plus_one_forward_ms": one, "serve": [], "naive": []}
    if bf16:
        rounded = load_classifier(head, engine="auto", trust_hub=True, precision="auto")
        px = torch.stack([model.pixels(b) for b in bodies])
        out["bf16_engine"] = rounded.engine_name
        out["bf16_top1_agreement"] = float(np.mean(model.probabilities(px).argmax(1) == rounded.probabilities(px).argmax(1)))
        out["serve_bf16"] = []
    naive_app = work / "naive_server.py"
    naive_app.write_text(NAIVE_SERVER.format(root=str(ROOT), head=str(head)))
    servers = {
        "serve": lambda port: [sys.executable, str(ROOT / "cli.py"), "serve", str(head), "--port", str(port), "--trust-hub", "--quiet"],
        **({"serve_bf16": lambda port: [sys.executable, str(ROOT / "cli.py"), "serve", str(head), "--port", str(port), "--trust-hub", "--quiet",
                                        "--precision", "auto"]} if bf16 else {}),
        "naive": lambda port: [sys.executable, "-m", "uvicorn", "--app-dir", str(work), "naive_server:app", "--port", str(port), "--log-level", "warning"],
    }
    for name, command in servers.items():
        port = _free_port()
        proc = _start_server(command(port), port, work / f"{name}.log")
        try:
            for clients, requests in levels:
                out[name].append(load(port, bodies, clients, requests))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N, for CI: proves the bench runs, not a measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default=None, help="default resnet50 (--quick: resnet18)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-rows", type=int, default=None)
    ap.add_argument("--serve-model", default=None, help="the backbone exported and served (default resnet18)")
    ap.add_argument("--requests", type=int, default=2000, help="serve: requests per load level (all clients together)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featcache-bench-jpegs")
    args = ap.parse_args()
    quick = args.quick
    model = args.model or ("resnet18" if quick else "resnet50")
    images = args.images or (32 if quick else 512)
    cache_rows = args.cache_rows or (20_000 if quick else 100_000)
    data = make_jpegs(args.data.with_name(args.data.name + ("-quick" if quick else "")), images)
    r: dict = {"model": model, "images": images, "batch_size": args.batch_size, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "cpu": cpu_summary(), "torch": str(torch.__version__)}
    with tempfile.TemporaryDirectory(prefix="featcache-bench-predict-") as tmp:
        work = Path(tmp)
        if not quick:  # as `featcache engines` does once per machine: auto then picks the same engine for both
            ctx = engine_context(load_backbone(model, "none"), torch.device("cpu"), FP32, args.batch_size, work)
            r["engines_alone"] = tune(ctx, min_seconds=3.0).rates
        s = run_extract(data, model, "none", work / "photos.h5", batch_size=args.batch_size)
        r["extract_img_s"], r["extract_engine"] = s.new / s.seconds, s.engine
        head = Path(fit_head(work / "photos.h5", "logreg", work / "photos.head.pt", plots=False, C=1.0).head_path)
        runs = []
        for k in range(1 if quick else 2):
            p = predict(head, [data], PredictOptions(out=str(work / f"p{k}.csv"), batch_size=args.batch_size))
            runs.append(p.n / p.seconds)
        r["predict_img_s"], r["predict_engine"] = max(runs), p.engine
        r["eager_loop_img_s"] = eager_loop(head, data, args.batch_size)
        r["predict_vs_extract"] = r["predict_img_s"] / r["extract_img_s"]
        r["predict_vs_eager_loop"] = r["predict_img_s"] / r["eager_loop_img_s"]
        r["cache"] = cache_rows_per_minute(work, cache_rows, 2048, 1 if quick else 3)
        # the deployed model: a light backbone (serving resnet50 2,000 times per level on 2 cores would take an hour)
        light = args.serve_model or "resnet18"
        run_extract(data, light, "none", work / "light.h5", batch_size=args.batch_size)
        light_head = Path(fit_head(work / "light.h5", "logreg", work / "light.head.pt", plots=False, C=1.0).head_path)
        bf16 = choose_precision("auto", torch.device("cpu"))
        if not quick:  # as a deployer runs `featcache engines` once: serve's auto then runs the fastest engine
            for precision in ([FP32, bf16] if bf16.name != "fp32" else [FP32]):
                tune(engine_context(load_backbone(light, "none"), torch.device("cpu"), precision, 32, work), min_seconds=2.0)
        r["deployed_model"] = light
        r["onnx"] = onnx_side_by_side(light_head, data, work, quick)
        r["serve"] = serve_side_by_side(light_head, data, work, quick, args.requests, bf16=bf16.name == "bf16")
    if args.json:
        print(json.dumps(r, default=str))
        return
    print(f"{model}, {images} JPEGs 500x375, batch {args.batch_size}, {r['cores']} cores, {r['cpu'].get('capability', '')}, torch {r['torch']}")
    if "engines_alone" in r:
        print("engines alone (img/s): " + ", ".join(f"{k} {v:.1f}" if v else f"{k} n/a" for k, v in r["engines_alone"].items()))
    print(f"extract end to end ({r['extract_engine']})      : {r['extract_img_s']:8.2f} img/s")
    print(f"predict end to end ({r['predict_engine']})      : {r['predict_img_s']:8.2f} img/s")
    print(f"predict's earlier eager loop          : {r['eager_loop_img_s']:8.2f} img/s")
    c = r["cache"]
    print(f"predict --cache, {c['rows']:,} x {c['dim']:,} logreg: {c['seconds']:.2f} s = {c['rows_per_min']:,.0f} rows/min  (goal >= 1,000,000)")
    print(f"predict / extract = {r['predict_vs_extract']:.2f}  (goal >= 0.9);  predict / earlier loop = {r['predict_vs_eager_loop']:.2f}")
    o = r["onnx"]
    if "skipped" in o:
        print(f"ONNX: skipped ({o['skipped']})")
    else:
        print(f"{r['deployed_model']} + logreg exported to ONNX ({o['onnx_mib']} MiB, {o['export_seconds']} s, max |dp| {o['max_abs_diff']:.1e}):")
        print(f"  batch 1 : ONNX Runtime {o['onnxruntime_batch1_ms']:7.1f} ms   eager torch {o['torch_eager_batch1_ms']:7.1f} ms   "
              f"({o['torch_eager_batch1_ms'] / o['onnxruntime_batch1_ms']:.2f}x)")
        print(f"  batch 32: ONNX Runtime {o['onnxruntime_batch32_img_s']:7.1f} img/s eager torch {o['torch_eager_batch32_img_s']:7.1f} img/s "
              f"({o['onnxruntime_batch32_img_s'] / o['torch_eager_batch32_img_s']:.2f}x)")
    v = r["serve"]
    if "skipped" in v:
        print(f"serve: skipped ({v['skipped']})")
    else:
        print(f"serve {r['deployed_model']} + logreg vs a naive handler (same FastAPI + uvicorn, one eager forward per request); "
              f"decode + one forward alone {v['decode_plus_one_forward_ms']:.1f} ms:")
        columns = [k for k in ("serve", "serve_bf16", "naive") if v.get(k)]
        print("  clients" + "".join(f"   {name + ' p50/p99 ms':>23} {'req/s':>7}" for name in columns) + "   ratio(s) to naive")
        for i, level in enumerate(v["naive"]):
            rows = [v[name][i] for name in columns]
            print(f"  {level['clients']:>7}" + "".join(f"   {a['p50_ms']:11.1f}/{a['p99_ms']:<11.1f} {a['req_s']:7.1f}" for a in rows) + "   "
                  + " ".join(f"{v[name][i]['req_s'] / level['req_s']:.2f}x" for name in columns if name != "naive"))
        top, single = v["serve"][-1], v["serve"][0]
        print(f"goals: serve / naive at {top['clients']} clients = {top['req_s'] / v['naive'][-1]['req_s']:.2f} (>= 3)"
              + (f", serve --precision auto ({v['bf16_engine']} bf16; top-1 equal to fp32 on {v['bf16_top1_agreement']:.1%} of the JPEGs) / naive = "
                 f"{v['serve_bf16'][-1]['req_s'] / v['naive'][-1]['req_s']:.2f}" if v.get("serve_bf16") else "")
              + f"; p50 at 1 client / (decode + one forward) = {single['p50_ms'] / v['decode_plus_one_forward_ms']:.2f} (<= 1.3)")


if __name__ == "__main__":
    main()
