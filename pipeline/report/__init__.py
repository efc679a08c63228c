"""The report: one self-contained HTML file about a head or fine-tuned model and its data
(``build.py``): provenance, metrics, confusion matrix, training curves, the misclassified
images with their nearest training images, and the audit of ``pipeline.quality`` (label
errors, near-duplicates and split leaks, a 2-D map, what to do); thumbnails embedded
(``thumbnails.py``), pictures as PNG data (``figures.py``), plain escaped HTML
(``html.py``, ``sections.py``).

Reads images only to make thumbnails; computes nothing the quality and heads stages do not.
"""
from .build import ReportResult, default_report_path, write_report

__all__ = ["ReportResult", "default_report_path", "write_report"]
