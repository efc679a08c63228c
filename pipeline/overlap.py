"""What lets stage 1's writer overlap the model on a GPU, and shows whether the stages overlap:
the writer's thread and the clock that splits a run's time between the stages
(``ExtractSummary.timings``). The reader's side is ``images/feeder.py``.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class WriterThread:
    """CUDA: batches written (rows buffered, parts committed and fsynced) on a thread of their
    own, so a commit never holds up the next forward. At most ``depth`` batches wait; an error
    in the thread is raised in the caller at its next ``submit`` or at ``close``."""

    def __init__(self, write: Callable[[list], None], depth: int = 4):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, launched: list) -> None:
        self._check()
        self._queue.put(launched)

    def close(self, raise_error: bool = True) -> None:
        """Write everything submitted, then stop; raises the thread's error, if any (unless
        another error is already on its way out)."""
        self._queue.put(None)
        self._thread.join()
        if raise_error:
            self._check()


@dataclass
class StageClock:
    """Where a run's time goes (seconds), reported in ``ExtractSummary.timings``: setting up
    (scan, backbones, caches, engines; the decoder processes already read meanwhile),
    waiting for the first batch, waiting for data later (the reader is behind), the writer
    (buffering rows, commits), and on CUDA the GPU's busy time on the model's stream (events
    around each batch's normalise + forward + copy back)."""

    start: float = field(default_factory=time.perf_counter)
    setup: float = 0.0
    first_batch: float = 0.0
    wait_data: float = 0.0
    writer: float = 0.0
    commit: float = 0.0
    finish: float = 0.0  # the last commit and compaction
    feeder_busy: float = 0.0  # CUDA: the feeder thread's host time moving and decoding batches
    images_after_first: int = 0
    loop: float = 0.0
    _gpu_events: list[tuple[Any, Any]] = field(default_factory=list)

    def gpu_span(self, device: torch.device) -> Callable[[], None]:
        """Record a start event now; the returned function records the end."""
        if device.type != "cuda":
            return lambda: None
        start = torch.cuda.Event(enable_timing=True)
        start.record()

        def end() -> None:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._gpu_events.append((start, stop))

        return end

    def report(self) -> dict[str, float]:
        out = {"setup_s": self.setup, "first_batch_s": self.first_batch, "wait_data_s": self.wait_data, "writer_s": self.writer,
               "commit_s": self.commit, "loop_s": self.loop, "finish_s": self.finish}
        if self.feeder_busy:
            out["feeder_busy_s"] = self.feeder_busy
        steady = self.loop - self.first_batch
        if self.images_after_first and steady > 0:
            out["steady_img_s"] = self.images_after_first / steady
        if self._gpu_events:
            self._gpu_events[-1][1].synchronize()
            busy = sum(a.elapsed_time(b) for a, b in self._gpu_events) / 1000
            out["gpu_busy_s"] = busy
            out["gpu_busy_share"] = busy / self.loop if self.loop > 0 else 0.0
        return {k: round(v, 4) for k, v in out.items()}
