"""Data quality on cached embeddings: out-of-fold probabilities (``oof.py``), likely label
errors by confident learning (``label_errors.py``), near-duplicates and split leaks
(``duplicates.py`` over the blocked exact search of ``similarity.py``), all in the whitened
principal-component space of ``space.py``; a 2-D map (``embedding_map.py``); the audit that
runs them and counts what they found (``audit.py``), and what to do about it (``advice.py``).

Never reads images (the report does, for thumbnails) and never trains a head it keeps.
"""
from .advice import advice
from .audit import Audit, Projected, audit_cache, audit_projected, cache_rows, format_audit, project, project_rows, run_audit
from .duplicates import Duplicates, find_duplicates, leak_mask, with_split
from .embedding_map import EmbeddingMap, check_map_method, embedding_map
from .label_errors import LabelIssues, find_label_issues
from .oof import OutOfFold, out_of_fold_proba
from .options import DEFAULT_DUPLICATE_THRESHOLD, AuditOptions, ReportOptions, parse_fail_on
from .precision import POOR_PRECISION, PrecisionEstimate, estimate_precision
from .similarity import pairs_above, top_k, unit_rows
from .space import EmbeddingSpace, fit_space
from .spill import CacheRows, SpilledRows, rows_of

__all__ = ["POOR_PRECISION", "PrecisionEstimate", "estimate_precision", "Audit", "AuditOptions", "DEFAULT_DUPLICATE_THRESHOLD", "Duplicates", "EmbeddingMap", "EmbeddingSpace", "LabelIssues", "OutOfFold",
           "CacheRows", "Projected", "ReportOptions", "SpilledRows", "cache_rows", "project", "rows_of", "advice", "audit_cache", "audit_projected", "check_map_method", "embedding_map", "find_duplicates",
           "find_label_issues", "fit_space", "format_audit", "leak_mask", "out_of_fold_proba", "pairs_above", "parse_fail_on",
           "project_rows", "run_audit", "top_k", "unit_rows", "with_split"]
