"""serve: a real process on 127.0.0.1 (a free port), real HTTP requests (http.client).

Predictions are compared with ``predict_images`` on the same files; every kind of bad input
gets its 4xx and the next good request still succeeds; SIGTERM answers what is in flight.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOL = 1e-4


class Server:
    """``python cli.py serve MODEL --port 0 ARGS`` in its own process; the port is read from its log line."""

    def __init__(self, model: Path, folder: Path, *args: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.err, self.out = folder / f"serve-{uuid.uuid4().hex[:6]}.err", folder / "serve.out"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(model), "--port", "0", *args],
                                     stdout=open(self.out, "w"), stderr=open(self.err, "w"), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 180
        while True:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", self.err.read_text())
            if found:
                self.port = int(found.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"serve did not start (exit {self.proc.poll()}): {self.err.read_text()}")
            time.sleep(0.1)
        while self.get("/health")[0] != 200:
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw)

    def get(self, path: str) -> tuple[int, dict]:
        try:
            return self.request("GET", path)
        except ConnectionError:
            return 0, {}

    def post_image(self, data: bytes, ctype: str | None = "image/png", query: str = "") -> tuple[int, dict]:
        return self.request("POST", "/predict" + query, data, {"Content-Type": ctype} if ctype else {})

    def post_files(self, files: list[tuple[str, bytes]], fields: dict[str, str] | None = None, query: str = "") -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in (fields or {}).items()]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                  + data + b"\r\n" for name, data in files]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/predict" + query, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def digit_files(head: Path, n: int) -> list[Path]:
    from pipeline.heads import load_head

    files = sorted(Path(load_head(head).provenance["data_root"]).rglob("*.png"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def predicted(head: Path, files: list[Path], k: int) -> list[dict]:
    """predict's rows for ``files`` with its top-``k``: the reference."""
    from pipeline.predict import predict_images

    return predict_images(head, files, topk=k, workers=0, trust_hub=True).rows


def assert_same(answer: dict, row: dict, name: str | None) -> None:
    assert answer["file"] == name
    assert answer["predicted"] == row["predicted"]
    assert [t["class"] for t in answer["topk"]] == [t["class"] for t in row["topk"]]
    np.testing.assert_allclose([t["probability"] for t in answer["topk"]], [t["probability"] for t in row["topk"]], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def pt_server(tiny_head, tmp_path_factory):
    server = Server(tiny_head, tmp_path_factory.mktemp("serve_pt"), "--trust-hub", "--engine", "eager", "--max-body", "20000",
                    "--max-pixels", "5000", "--max-wait-ms", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def onnx_server(tiny_head, tmp_path_factory):
    pytest.importorskip("onnxscript")
    from pipeline.serving import export_model

    folder = tmp_path_factory.mktemp("serve_onnx")
    model = Path(export_model(tiny_head, folder / "m.onnx", trust_hub=True, probe_images=2).path)
    server = Server(model, folder)
    yield server
    server.stop()


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_predictions_equal_predict(request, tiny_head, kind):
    server = request.getfixturevalue(f"{kind}_server")
    files = digit_files(tiny_head, 4)
    reference = predicted(tiny_head, files, 3)
    status, body = server.post_image(files[0].read_bytes(), query="?topk=3")  # raw body
    assert status == 200, body
    assert len(body["predictions"]) == 1
    assert_same(body["predictions"][0], reference[0], None)
    status, body = server.post_files([(f.name, f.read_bytes()) for f in files[1:]], query="?topk=3")  # several files in one request
    assert status == 200, body
    for answer, row, f in zip(body["predictions"], reference[1:], files[1:], strict=True):
        assert_same(answer, row, f.name)
    status, body = server.post_image(files[0].read_bytes())  # the default top-k: 5
    assert status == 200 and len(body["predictions"][0]["topk"]) == 5


def test_bad_input_gets_a_4xx_and_the_service_goes_on(pt_server, tiny_head, tmp_path):
    good = digit_files(tiny_head, 1)[0]
    reference = predicted(tiny_head, [good], 2)[0]
    png = good.read_bytes()
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100), "white").save(bomb)  # 10,000 pixels, over --max-pixels 5000, a few hundred bytes
    assert len(bomb.read_bytes()) < 20000
    cases = [
        ("not an image", lambda: pt_server.post_image(b"hello, not a picture"), 422, "not an image"),
        ("truncated", lambda: pt_server.post_image(png[: len(png) // 2]), 422, "truncated"),
        ("decompression bomb", lambda: pt_server.post_image(bomb.read_bytes()), 422, "over --max-pixels 5000"),
        ("body over --max-body", lambda: pt_server.post_image(os.urandom(30000)), 413, "over the limit of 20,000 (--max-body)"),
        ("chunked body over --max-body", lambda: pt_server.request("POST", "/predict", iter([os.urandom(8000)] * 4), {"Content-Type": "image/png"}),
         413, "more than"),
        ("wrong content type", lambda: pt_server.post_image(png, "text/plain"), 415, "'text/plain' is not an image"),
        ("no content type", lambda: pt_server.post_image(png, None), 415, "is not an image"),
        ("empty body", lambda: pt_server.post_image(b""), 400, "empty body"),
        ("form without files", lambda: pt_server.post_files([], {"note": "hi"}), 400, "holds no files"),
        ("one bad file among good ones", lambda: pt_server.post_files([("a.png", png), ("b.png", b"junk")]), 422, "file 'b.png': not an image"),
        ("bad topk", lambda: pt_server.post_image(png, query="?topk=zero"), 400, "topk='zero'"),
        ("unknown path", lambda: pt_server.request("GET", "/nope"), 404, "Not Found"),
    ]
    for name, send, status, fragment in cases:
        got, body = send()
        assert (got, list(body)) == (status, ["error"]), (name, got, body)
        assert fragment in body["error"] and "\n" not in body["error"], (name, body)
        ok, answer = pt_server.post_image(png, query="?topk=2")  # and the service goes on
        assert ok == 200, (name, answer)
        assert_same(answer["predictions"][0], reference, None)
    assert pt_server.proc.poll() is None


def test_health_and_metadata(onnx_server, tiny_head):
    from pipeline.heads import load_head

    prov = load_head(tiny_head).provenance
    status, health = onnx_server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["engine"] == "onnxruntime" and health["classes"] == len(prov["classes"])
    assert health["precision"] == meta_precision(onnx_server) == "fp32"
    status, meta = onnx_server.get("/metadata")
    assert status == 200 and meta["classes"] == list(prov["classes"])
    assert meta["preprocessing"]["crop_size"] == [32] and meta["preprocessing"]["input"] == "float"
    assert {k: meta["provenance"][k] for k in ("model", "weights", "seed", "cache_fingerprint")} == {k: prov[k] for k in ("model", "weights", "seed", "cache_fingerprint")}
    assert meta["serving"]["max_batch"] == 32


def meta_precision(server: Server) -> str:
    return server.get("/metadata")[1]["serving"]["precision"]


def test_sigterm_answers_what_is_in_flight_and_exits_0(tiny_head, tmp_path):
    """Three requests wait in one micro-batch (--max-wait-ms 3000) when SIGTERM comes: all three
    are answered, in one batch, and the process exits 0; then nothing listens."""
    server = Server(tiny_head, tmp_path, "--trust-hub", "--engine", "eager", "--max-wait-ms", "3000", "--max-batch", "64", "--json")
    files = digit_files(tiny_head, 3)
    reference = predicted(tiny_head, files, 2)
    answers: dict[int, tuple[int, dict]] = {}

    def send(i: int) -> None:
        answers[i] = server.post_image(files[i].read_bytes(), query="?topk=2")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.get("/health")[1].get("in_flight") != 3:  # all three decoded and waiting in the batcher
        assert time.monotonic() < deadline, server.err.read_text()
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0, server.err.read_text()
    for i in range(3):
        status, body = answers[i]
        assert status == 200, body
        assert_same(body["predictions"][0], reference[i], None)
    summary = json.loads(server.out.read_text().strip())
    assert (summary["requests"], summary["images"], summary["batches"], summary["stopped_by"]) == (3, 3, 1, "SIGTERM")
    with pytest.raises(ConnectionRefusedError):
        server.request("GET", "/health")


def test_micro_batcher_batches_across_requests_up_to_max_batch():
    """Concurrent submissions share model calls of at most max_batch images; each gets its own rows."""
    from pipeline.serving.server import MicroBatcher

    sizes: list[int] = []

    def run(batch: torch.Tensor) -> np.ndarray:
        sizes.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :1].double().numpy()

    async def main() -> list:
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.2)
        batcher.start()
        requests = [[torch.full((3, 2, 2), 10 * r + i, dtype=torch.uint8) for i in range(n)] for r, n in enumerate([3, 2, 1, 1])]
        results = await asyncio.gather(*(batcher.submit(req) for req in requests))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert sizes == [4, 3]  # 7 images from 4 requests in 2 model calls, none over 4
    for r, rows in enumerate(results):
        assert [int(row[0]) for row in rows] == [10 * r + i for i in range(len(rows))]


def test_a_head_file_runs_on_the_engine_asked_for(tiny_head, said):
    """The classifier behind serve for a .pt file: auto without a measured choice is eager (and
    says how to measure), a named engine is built and checked; both give predict's numbers."""
    pytest.importorskip("onnxruntime")
    from pipeline.serving import load_classifier

    auto = load_classifier(tiny_head, trust_hub=True, engine="auto", device="cpu")
    ort = load_classifier(tiny_head, trust_hub=True, engine="onnxruntime", device="cpu")
    assert (auto.engine_name, ort.engine_name) == ("eager", "onnxruntime")
    assert any("engines --model hub:" in m and "--batch-size 32" in m for m in said), said
    files = digit_files(tiny_head, 4)
    px = torch.stack([auto.pixels(f.read_bytes()) for f in files])
    rows = predicted(tiny_head, files, len(auto.classes))
    expected = np.array([[{t["class"]: t["probability"] for t in r["topk"]}[c] for c in auto.classes] for r in rows])
    np.testing.assert_allclose(auto.probabilities(px), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ort.probabilities(px), expected, atol=TOL, rtol=0)


def test_serve_precision_bf16_where_native_and_not_for_an_onnx_file(tiny_head, tmp_path, said):
    """``--precision bf16`` runs the backbone in bf16 where the CPU has it natively (else fp32,
    said once), within bf16's rounding of the fp32 numbers; an .onnx file refuses the flag."""
    from pipeline.backbones.hardware import choose_precision
    from pipeline.errors import UsageError
    from pipeline.serving import load_classifier

    fp32 = load_classifier(tiny_head, trust_hub=True, engine="eager", device="cpu")
    bf16 = load_classifier(tiny_head, trust_hub=True, engine="eager", device="cpu", precision="bf16")
    expected = choose_precision("bf16", torch.device("cpu"))
    assert (fp32.precision, bf16.precision) == ("fp32", expected.name)
    assert said and said[0] == expected.note  # "bf16: CPU has AMX ..." or why it runs fp32 here
    files = digit_files(tiny_head, 8)
    px = torch.stack([fp32.pixels(f.read_bytes()) for f in files])
    exact, rounded = fp32.probabilities(px), bf16.probabilities(px)
    np.testing.assert_allclose(rounded, exact, atol=5e-2, rtol=0)
    if expected.name == "bf16":
        assert not np.array_equal(rounded, exact)  # it really ran in bf16
    (tmp_path / "m.onnx").write_bytes(b"not read")
    with pytest.raises(UsageError, match=r"--precision applies to a head or model file \(\.pt\)"):
        load_classifier(tmp_path / "m.onnx", precision="bf16")


def test_every_serve_option_is_a_flag_of_serve():
    import dataclasses

    import typer

    from cli import app
    from pipeline.serving.server import ServeOptions

    flags = {opt for p in typer.main.get_command(app).commands["serve"].params for opt in p.opts}
    for f in dataclasses.fields(ServeOptions):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_bad_serve_options_are_refused_naming_the_flag():
    from pipeline.errors import UsageError
    from pipeline.serving.server import ServeOptions

    for fields, needle in (({"port": 70000}, "--port must be 0-65535"), ({"max_batch": 0}, "--max-batch must be 1 or more"),
                           ({"engine": "tensorrt"}, "--engine 'tensorrt'"), ({"max_body": 0}, "--max-body"),
                           ({"precision": "int8"}, "--precision 'int8'")):
        with pytest.raises(UsageError, match=re.escape(needle)):
            ServeOptions(**fields)


def test_a_taken_port_is_one_line():
    import socket

    from pipeline.errors import UsageError
    from pipeline.serving.server import _listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*; choose another --port"):
            _listen("127.0.0.1", port)
    free = _listen("127.0.0.1", 0)  # 0: any free port
    assert free.getsockname()[1] > 0
    free.close()


def test_serve_without_the_extra_names_it(tiny_head, monkeypatch):
    import importlib.util

    from pipeline.errors import UsageError
    from pipeline.serving.server import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("fastapi", "uvicorn") else real(name, *a))
    with pytest.raises(UsageError, match=r"serve needs fastapi and uvicorn: pip install 'featcache\[serve\]'"):
        serve(tiny_head, trust_hub=True)
