"""featcache: frozen backbones once, embeddings cached in HDF5, heads trained in seconds."""
__version__ = "0.1.0"

from .errors import FeatcacheError  # noqa: E402
from .heads import load_head  # noqa: E402
from .store import CacheData, load_cache, read_cache_meta  # noqa: E402

__all__ = ["__version__", "CacheData", "FeatcacheError", "load_cache", "load_head", "read_cache_meta"]
