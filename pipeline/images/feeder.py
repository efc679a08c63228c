"""CUDA: batches moved to the GPU (and, with ``--decode gpu``, decoded there) on a side stream,
by a thread that keeps ``depth`` batches ahead of the model.

While the model runs batch k on the main stream, batch k+1's pixels are pinned and copied to
the device and its JPEGs decoded and resized on the side stream; an event orders each batch
after its own copy and decode, never after the next one's. Tensors made on the side stream are
recorded on the main stream, so the caching allocator cannot hand their memory back to the
side stream while the model still reads them. The pinning happens here, not in the
DataLoader's pin thread: this thread starts once the engines are built, and a CUDA graph being
captured must not see another thread allocate page-locked memory (seen on an H200: it broke
the capture).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .gpu_decode import GpuJpegDecoder
from .reader import DecodedBatch, finish_on_gpu

_END = object()


class DeviceFeeder:
    """Iterates ``batches`` (lists of one ``DecodedBatch`` per backbone) with their images on
    ``device``, ready on the current stream. ``close()`` stops the thread (also on errors)."""

    def __init__(self, batches: Iterable[list[DecodedBatch]], device: torch.device, to_pixels: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 decoder: GpuJpegDecoder | None, depth: int = 2):
        self.device = device
        self.to_pixels = list(to_pixels)
        self.decoder = decoder
        self.stream = torch.cuda.Stream(device)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.busy_seconds = 0.0  # host time the thread spent moving and decoding (not waiting)
        self._batches = iter(batches)
        self._thread = threading.Thread(target=self._run, name="featcache-device-feeder", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self.stream):
                for parts in self._batches:
                    t0 = time.perf_counter()
                    for part in parts:
                        if part.images is not None:  # page-locked first, so the copy is asynchronous
                            part.images = part.images.pin_memory().to(self.device, non_blocking=True)
                    if self.decoder is not None:
                        finish_on_gpu(parts, self.to_pixels, self.decoder)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                    self.busy_seconds += time.perf_counter() - t0
                    if not self._put((parts, done)):
                        return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[list[DecodedBatch]]:
        main = torch.cuda.current_stream(self.device)
        while True:
            item = self.ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            parts, done = item
            main.wait_event(done)
            for part in parts:
                if part.images is not None:
                    part.images.record_stream(main)
            yield parts

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; it may be waiting for the loader's next batch, so give up after
        ``timeout`` seconds (it is a daemon and ends when the loader does)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
