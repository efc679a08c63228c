"""featcache: frozen backbones once, embeddings cached in HDF5, heads trained in seconds."""
__version__ = "0.1.0"

import logging
from importlib import import_module
from typing import Any

from .threads import prefer_short_spins

prefer_short_spins()  # before anything here imports torch: OpenMP reads it when it loads
# torch.compile imports cpp_extension, which logs "No CUDA runtime is found, using CUDA_HOME=..."
# on every machine without CUDA: not news, and nothing a user of a CPU machine can act on
logging.getLogger("torch.utils.cpp_extension").addFilter(lambda record: "No CUDA runtime is found" not in record.getMessage())

# The public API, imported on first use: `import pipeline.choices` (the command line's
# --help) must not pay for torch.
_PUBLIC = {"FeatcacheError": ".errors", "load_head": ".heads", "CacheData": ".store", "load_cache": ".store", "read_cache_meta": ".store",
           "audit_cache": ".quality", "write_report": ".report"}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
