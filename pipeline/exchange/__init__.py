"""Caches out and in: a cache exported as Parquet or as ``embeddings.npy`` + ``metadata.parquet``
(the layout clip-retrieval writes), and those layouts imported back into a cache.

``layout.py`` holds the exchange format in one place (file names, columns, metadata keys,
detection of a source), ``export.py`` streams a cache's rows out in bounded memory, and
``importing.py`` writes rows computed elsewhere into a cache through the public
``CacheWriter``. pyarrow is an optional extra (``pip install -e '.[parquet]'``), imported only
when an export or import runs.

Never reads HDF5 itself (``pipeline.store``'s public readers and writer do) and never
decides what a row is: it copies path, label, class, split and embedding as they are.
"""
from .export import ExportSummary, export_cache
from .importing import ImportSummary, import_cache
from .layout import EXPORT_FORMATS, EXPORT_SCHEMA, require_pyarrow

__all__ = ["EXPORT_FORMATS", "EXPORT_SCHEMA", "ExportSummary", "ImportSummary", "export_cache", "import_cache", "require_pyarrow"]
