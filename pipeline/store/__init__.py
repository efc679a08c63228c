"""The embedding store: the only package that imports h5py. The schema (one place,
versioned), atomic part commits and the index (writer), readers, writer locks and the
atomic-file helper every artifact uses.

Never decides what to extract: it keeps what it is given, and refuses to mix rows of
different backbones, weights or preprocessing.
"""
from ..choices import DTYPES
from .atomic import atomic_path, ensure_free_space, payload_bytes, write_bytes_atomically
from .locks import WriterLock, lock_path_for
from .reader import CacheData, RowTable, cache_disk_bytes, iter_embeddings, load_cache, read_cache_meta, read_index_info, read_rows
from .schema import weights_identity
from .writer import CacheWriter, PendingRow

__all__ = ["DTYPES", "CacheData", "CacheWriter", "PendingRow", "RowTable", "WriterLock", "atomic_path", "cache_disk_bytes", "ensure_free_space", "payload_bytes", "write_bytes_atomically", "iter_embeddings",
           "load_cache", "lock_path_for", "read_cache_meta", "read_index_info", "read_rows", "weights_identity"]
