"""featcache: frozen backbones once, embeddings cached in HDF5, heads trained in seconds."""
__version__ = "0.1.0"

from importlib import import_module
from typing import Any

# The public API, imported on first use: `import pipeline.choices` (the command line's
# --help) must not pay for torch.
_PUBLIC = {"FeatcacheError": ".errors", "load_head": ".heads", "CacheData": ".store", "load_cache": ".store", "read_cache_meta": ".store",
           "audit_cache": ".quality", "write_report": ".report"}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
