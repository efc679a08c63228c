"""What this machine's hardware runs natively, decided at run time (never assumed).

Reduced precision pays only where the silicon has it: on CPU, AMX or AVX-512 BF16
instructions make bf16 several times faster than fp32, while on a CPU with only AVX2 it
is emulated and several times slower. On CUDA, bf16 needs compute capability >= 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..choices import PRECISIONS


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_summary() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
    }


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 runs natively on ``device``, why)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (major >= 8, f"CUDA compute capability {major}.{minor}" + ("" if major >= 8 else " (bf16 needs >= 8.0)"))
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "CPU has AMX (amx_bf16)"
    if "avx512_bf16" in flags:
        return True, "CPU has AVX-512 BF16 (avx512_bf16)"
    return False, "CPU has neither AMX nor AVX-512 BF16: bf16 would be emulated, several times slower than fp32"


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # what runs: fp32, bf16 or fp16
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    note: str  # one line for the log when the request was changed or needs explaining


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """``fp32`` exact; ``bf16``/``fp16`` where native (else fp32, saying why); ``auto`` bf16 where native."""
    from ..errors import UsageError

    if requested not in PRECISIONS:
        raise UsageError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return PrecisionChoice("fp32", None, "")
    if requested == "fp16":
        if device.type != "cuda":
            return PrecisionChoice("fp32", None, "fp16 runs natively only on CUDA here; running in exact fp32 instead")
        return PrecisionChoice("fp16", torch.float16, "")
    ok, why = native_bf16(device)
    if ok:
        return PrecisionChoice("bf16", torch.bfloat16, f"bf16: {why}")
    if requested == "auto":
        return PrecisionChoice("fp32", None, f"precision auto -> fp32: {why}")
    return PrecisionChoice("fp32", None, f"--precision bf16 refused: {why}; running in exact fp32 instead")
