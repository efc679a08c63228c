"""The embedding store: the only package that imports h5py.

A cache is a small manifest ``X.h5`` plus immutable, checksummed part files in
``X.h5.parts/`` (schema 2: ``manifest.py``, ``parts.py``). Commits cost the same whatever
the cache's size (``writer.py``), compaction is size-tiered and streams with a fixed memory
budget (``compaction.py``), readers pin one version and read it to the end
(``snapshot.py``, ``leases.py``), and every byte is checked (``h5files.py``, ``verify.py``).
Schema-1 caches are read as they are and migrated by the first write (``legacy.py``,
``migrate.py``).

Never decides what to extract: it keeps what it is given, and refuses to mix rows of
different backbones, weights or preprocessing.
"""
from ..choices import DTYPES
from .atomic import TMP_MARK, atomic_path, ensure_free_space, payload_bytes, remove_stale_temporaries, storage_error, write_bytes_atomically
from .columns import encode_paths, sha_hex
from .compaction import CompactionPolicy
from .known import KnownFiles
from .locks import WriterLock, lock_path_for
from .reader import CacheData, RowTable, cache_disk_bytes, iter_embeddings, load_cache, read_cache_meta, read_index_info, read_rows
from .schema import SCHEMA_VERSION, check_compatible, parts_dir_for, weights_identity
from .verify import RepairReport, VerifyReport, repair_cache, verify_cache
from .writer import CacheWriter, PendingRow, new_cache_meta

__all__ = ["DTYPES", "SCHEMA_VERSION", "TMP_MARK", "check_compatible", "remove_stale_temporaries", "CacheData", "CacheWriter", "CompactionPolicy", "KnownFiles", "PendingRow", "RepairReport", "RowTable",
           "VerifyReport", "WriterLock", "atomic_path", "cache_disk_bytes", "encode_paths", "ensure_free_space", "iter_embeddings", "load_cache", "lock_path_for",
           "new_cache_meta", "parts_dir_for", "payload_bytes", "read_cache_meta", "read_index_info", "read_rows", "repair_cache", "sha_hex", "storage_error", "verify_cache",
           "weights_identity", "write_bytes_atomically"]
