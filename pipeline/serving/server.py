"""``serve``: a classifier behind HTTP (FastAPI on uvicorn; the optional ``serve`` extra).

``POST /predict`` takes one image as the raw body (``Content-Type: image/...`` or
``application/octet-stream``) or several as ``multipart/form-data`` files and answers the
top-k classes of each, as ``predict`` computes them; ``GET /health``; ``GET /metadata``.

Requests are decoded in a thread pool (PIL releases the interpreter lock while it decodes
and resizes) exactly as extraction decodes, then micro-batched: the images of concurrent
requests wait at most ``max_wait_ms`` after the first of them for a batch of ``max_batch``,
and one thread runs the batches (one model call at a time; what arrives meanwhile forms the
next batch). Bad input is a 4xx with one JSON line ``{"error": ...}`` and the service goes
on. SIGTERM or Ctrl-C: uvicorn stops accepting, answers what is in flight, and the command
exits 0. It binds 127.0.0.1 unless told otherwise and has no authentication of its own.
"""
# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (``Request``,
# imported inside build_app so the extra stays optional) when they are defined
import asyncio
import collections
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import HubTrust
from ..choices import ENGINES, PRECISIONS
from ..errors import UsageError
from ..images import DEFAULT_MAX_PIXELS, DecodeError
from ..interrupts import signals_handled, stop_grace
from ..options import OUTSIDE_IDENTITY, build, check_device, check_types, choose, require
from ..predictions import score
from .classifier import Classifier, load_classifier

logger = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream",)  # besides image/*: what curl --data-binary users often send


@dataclass(frozen=True)
class ServeOptions:
    """How ``serve`` listens and batches: the command's flags."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log line says which)
    max_batch: int = 32  # images per model call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header (decompression bombs), as extract does
    max_body: int = 32 << 20  # bytes per request (413 above)
    topk: int = 5  # classes per image when the request does not say (?topk=N)
    engine: str = "auto"  # for a head or model file; an .onnx file runs on ONNX Runtime
    precision: str | None = None  # for a head or model file: None, the head's cache's; auto, bf16 where native
    device: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})
    workers: int | None = field(default=None, metadata={OUTSIDE_IDENTITY: True})  # decoder threads (None: one per core)

    def __post_init__(self) -> None:
        check_types(self)
        choose(self, "engine", ENGINES)
        if self.precision is not None:
            choose(self, "precision", PRECISIONS)
        check_device(self)
        require(0 <= self.port <= 65535, f"--port must be 0-65535 (0: any free port), got {self.port}")
        require(self.max_batch >= 1, f"--max-batch must be 1 or more, got {self.max_batch}")
        require(self.max_wait_ms >= 0, f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        require(self.max_pixels >= 1, f"--max-pixels must be 1 or more, got {self.max_pixels}")
        require(self.max_body >= 1, f"--max-body must be 1 or more bytes, got {self.max_body}")
        require(self.topk >= 1, f"--topk must be 1 or more, got {self.topk}")
        require(self.workers is None or self.workers >= 1, f"--workers must be 1 or more, got {self.workers}")


@dataclass
class ServeSummary:
    url: str
    engine: str
    requests: int = 0  # answered 200
    rejected: int = 0  # answered 4xx/5xx
    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    stopped_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_batch"] = round(self.images / self.batches, 2) if self.batches else 0.0
        return d


class RequestError(Exception):
    """A bad request: its HTTP status and the one-line message the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request whose body is over ``limit`` bytes is refused with 413 —
    at once when its Content-Length says so, else as soon as that many bytes arrived
    (chunked uploads), before any of it is parsed."""

    def __init__(self, app, limit: int, refused: Callable[[], None] = lambda: None):
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            self.refused()
            return await _send_json(send, 413, {"error": _too_large(int(length), self.limit)})
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(_too_large(seen, self.limit, at_least=True))
            return message

        return await self.app(scope, limited, send)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return f"request body of {'more than ' if at_least else ''}{size:,} bytes is over the limit of {limit:,} (--max-body)"


async def _send_json(send, status: int, obj: dict[str, Any]) -> None:
    import json

    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class MicroBatcher:
    """Images from concurrent requests in batches of at most ``max_batch``; the first image
    of a batch waits at most ``max_wait_s`` for the others. One thread runs the model."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], max_batch: int, max_wait_s: float):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.pending: collections.deque = collections.deque()  # (arrival time, pixels, future)
        self.arrived = asyncio.Event()
        self.closing = False
        self.batches = self.images = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="featcache-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Run what is pending, then stop."""
        self.closing = True
        self.arrived.set()
        if self.task is not None:
            await self.task
        self.pool.shutdown(wait=True)

    async def submit(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        if self.closing:
            raise RequestError(503, "the service is stopping; retry on another instance")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in pixels]
        now = loop.time()
        self.pending.extend((now, p, f) for p, f in zip(pixels, futures))
        self.arrived.set()
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self.closing:
                    return
                self.arrived.clear()
                await self.arrived.wait()
                continue
            deadline = self.pending[0][0] + self.max_wait_s  # the first image waits at most max_wait
            while len(self.pending) < self.max_batch and not self.closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            take = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            take = [t for t in take if not t[2].done()]  # a request that went away
            if not take:
                continue
            try:
                proba = await loop.run_in_executor(self.pool, self.run, torch.stack([p for _, p, _ in take]))
            except Exception as exc:  # every request of the batch gets the error; the service goes on
                for _, _, f in take:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(take)
            for (_, _, f), row in zip(take, proba):
                if not f.done():
                    f.set_result(row)


def _topk(query: dict[str, str], default: int, n_classes: int) -> int:
    raw = query.get("topk")
    if raw is None:
        return min(default, n_classes)
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise RequestError(400, f"topk={raw!r}: give a whole number of classes, 1 or more (this model has {n_classes})")
    return min(k, n_classes)


def build_app(classifier: Classifier, options: ServeOptions, summary: ServeSummary | None = None):
    """The FastAPI app serving ``classifier`` (its batcher and decoder threads live with the
    app: started and stopped by its lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    summary = summary if summary is not None else ServeSummary("", classifier.engine_name)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    decoders = ThreadPoolExecutor(options.workers or cores, thread_name_prefix="featcache-decode")
    batcher = MicroBatcher(classifier.probabilities, options.max_batch, options.max_wait_ms / 1000.0)
    classes = classifier.classes
    in_flight = [0]

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        logger.info(f"serving {classifier.source} ({classifier.engine_name} {classifier.precision}, {len(classes)} classes) on {summary.url}: POST /predict, GET /health, "
                    "GET /metadata; it has no authentication of its own (README: Export and serve)")
        try:
            yield
        finally:
            await batcher.stop()
            decoders.shutdown(wait=True)
            summary.batches, summary.images = batcher.batches, batcher.images

    app = FastAPI(title="featcache", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=options.max_body, refused=lambda: setattr(summary, "rejected", summary.rejected + 1))

    def refuse(status: int, message: str) -> JSONResponse:
        summary.rejected += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405, a malformed form: the same one-line JSON
        return refuse(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": classifier.engine_name, "precision": classifier.precision, "classes": len(classes), "in_flight": in_flight[0],
                "images": batcher.images, "batches": batcher.batches}

    @app.get("/metadata")
    async def metadata():
        return {**classifier.metadata(), "serving": {"engine": classifier.engine_name, "precision": classifier.precision, "max_batch": options.max_batch,
                                                     "max_wait_ms": options.max_wait_ms, "max_pixels": options.max_pixels, "max_body": options.max_body}}

    async def read_images(request: Request) -> list[tuple[str | None, bytes]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or ctype in RAW_TYPES:
            body = await request.body()
            if not body:
                raise RequestError(400, "empty body: send the image's bytes (curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg')")
            return [(None, body)]
        if ctype == "multipart/form-data":
            form = await request.form()
            try:
                files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
            finally:
                await form.close()
            if not files:
                raise RequestError(400, "the form holds no files; send each image as a file field (curl -F image=@cat.jpg)")
            empty = [name for name, data in files if not data]
            if empty:
                raise RequestError(400, f"file {empty[0]!r} is empty (0 bytes)")
            return files
        given = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
        raise RequestError(415, f"{given} is not an image: send the image's bytes with Content-Type image/jpeg (image/png, ...), "
                                "or multipart/form-data with one or several image files")

    async def decode(images: list[tuple[str | None, bytes]]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(decoders, classifier.pixels, data, options.max_pixels) for _, data in images),
                                       return_exceptions=True)
        for (name, _), r in zip(images, results):
            if isinstance(r, BaseException):
                what = f"file {name!r}: " if name is not None else ""
                reason = str(r) if isinstance(r, DecodeError) else f"cannot preprocess: {type(r).__name__}: {r}"
                raise RequestError(422, what + reason)
        return list(results)

    @app.post("/predict")
    async def predict(request: Request):
        in_flight[0] += 1
        try:
            k = _topk(dict(request.query_params), options.topk, len(classes))
            images = await read_images(request)
            rows = await batcher.submit(await decode(images))
        except RequestError as exc:
            return refuse(exc.status, str(exc))
        except BodyTooLarge as exc:
            return refuse(413, str(exc))
        except HTTPException as exc:
            return refuse(exc.status_code, str(exc.detail))
        except Exception as exc:  # the model failed on this batch: say so, keep serving
            logger.error(f"error: internal error on a request: {type(exc).__name__}: {exc}")
            return refuse(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            in_flight[0] -= 1
        summary.requests += 1
        top, top_p = score(np.stack(rows), k)  # as predict ranks them (ties: the lower class index)
        return {"predictions": [{"file": name, "predicted": classes[t[0]], "probability": float(q[0]),
                                 "topk": [{"class": classes[j], "probability": float(v)} for j, v in zip(t, q)]}
                                for (name, _), t, q in zip(images, top.tolist(), top_p.tolist())]}

    return app


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so port 0 gives a free port and a taken one is one line)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (0: any free one) or --host") from None
    return sock


def _server_class():
    import uvicorn

    class StopOnce(uvicorn.Server):
        """uvicorn's server, stopping gracefully on SIGTERM/SIGINT; unlike uvicorn's own
        ``capture_signals`` it does not raise the signal again once stopped (that would reach
        the command's SIGTERM-as-interrupt handler, exit 130, and the stop watchdog as a second
        signal), so a stopped service exits 0. ``stop_signals``: what stopped it."""

        stop_signals: list[int]

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            self.stop_signals = []

            def handle(signum, frame):
                self.stop_signals.append(signum)
                self.handle_exit(signum, frame)

            with signals_handled(handle, signal.SIGTERM, signal.SIGINT):
                yield

    return StopOnce


def serve(path: str | Path, options: ServeOptions | dict | None = None, *, trust_hub: HubTrust = False,
          quiet: bool = False, **fields: Any) -> ServeSummary:
    """Serve the head, fine-tuned model or exported ONNX file at ``path`` until SIGTERM or
    Ctrl-C; what was in flight is answered first. ``trust_hub``: consent to run the code of a
    ``hub:`` backbone a ``.pt`` file names.

    Raises:
        UsageError (the serve extra missing, the port taken), CacheError, UntrustedCodeError, ...
    """
    import importlib.util

    options = build(ServeOptions, options, **fields)
    missing = [p for p in ("fastapi", "uvicorn") if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"serve needs {' and '.join(missing)}: pip install 'featcache[serve]'")
    import copy

    import uvicorn

    classifier = load_classifier(path, trust_hub=trust_hub, engine=options.engine, device=options.device, batch_size=options.max_batch,
                                 precision=options.precision)
    sock = _listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    summary = ServeSummary(f"http://{'[' + host + ']' if ':' in host else host}:{port}", classifier.engine_name)
    app = build_app(classifier, options, summary)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is --json's
    config = uvicorn.Config(app, log_config=log_config, log_level="warning" if quiet else "info", access_log=not quiet,
                            timeout_graceful_shutdown=max(1.0, stop_grace() - 2.0))  # in-flight requests finish before the stop watchdog's grace
    t0 = time.perf_counter()
    server = _server_class()(config)
    server.run(sockets=[sock])
    got = getattr(server, "stop_signals", [])
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.stopped_by = signal.Signals(got[0]).name if got else ""
    logger.info(f"stopped{' by ' + summary.stopped_by if got else ''}: {summary.requests} request(s) answered ({summary.images} image(s) in "
                f"{summary.batches} batch(es)), {summary.rejected} refused")
    return summary
