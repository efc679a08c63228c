"""torchrun support: which rank this process is, and the few collectives featcache needs.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process joins the
group — NCCL on GPUs, gloo on CPU — and each rank gets its own GPU (``LOCAL_RANK``).
Without torchrun every call here is a cheap no-op for a world of one.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (one collective for all of them)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0; if it raises a featcache error, every rank raises the same
        error (no rank is left waiting at the next collective)."""
        from . import errors

        outcome: tuple[str, str] | None = None
        result = None
        if self.is_main:
            try:
                result = fn()
            except errors.FeatcacheError as exc:
                if not self.enabled:
                    raise
                outcome = (type(exc).__name__, str(exc))
        outcome = self.broadcast(outcome)
        if outcome is not None:
            cls = getattr(errors, outcome[0], errors.FeatcacheError)
            raise cls(outcome[1])
        return result


_world: World | None = None


def world(device_type: str = "cpu") -> World:
    """This process's place in a torchrun job (joining the process group on first call)."""
    global _world
    if _world is not None:
        return _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _world = World()
        return _world
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_leave_group)
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return _world


def _leave_group() -> None:
    """Close the process group before the interpreter tears down: left to the C++ destructors,
    a gloo rank whose peer had already exited once aborted ("terminate called without an
    active exception", under a loaded machine), failing a job that had finished."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; a peer may be gone
            pass


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: torch.device, w: World) -> torch.device:
    """One GPU per local rank."""
    return torch.device("cuda", w.local_rank) if device.type == "cuda" and w.enabled else device
