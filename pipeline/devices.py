"""Where work runs: ``--device`` and a head's ``device`` parameter as a torch device."""
from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(device: str) -> torch.device:
    """``--device`` (auto, cpu, cuda[:N]) as a torch device; a missing GPU is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r} is not supported; choose auto, cpu or cuda")
    return torch.device(device)


def head_device(name: str) -> torch.device:
    """A head's ``device`` parameter (any torch device name; ``auto``: the GPU when there is one).
    Not checked like ``--device``: a scikit-learn estimator's parameters fail at ``fit``, as torch says."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
