"""A trained model that leaves the tool: one ONNX file from images to class probabilities
(``export-model``) and an HTTP service (``serve``), both through one :class:`Classifier`
(a head or fine-tuned model file on its backbone, or an exported ONNX file on ONNX Runtime).

The HTTP side (FastAPI, uvicorn) is the optional ``serve`` extra, imported only when a
service starts.
"""
from .classifier import Classifier, OnnxClassifier, TorchClassifier, classifier_metadata, load_classifier, read_onnx
from .export import ExportError, ExportOptions, ExportResult, export_model

__all__ = ["Classifier", "ExportError", "ExportOptions", "ExportResult", "OnnxClassifier", "TorchClassifier", "classifier_metadata", "export_model",
           "load_classifier", "read_onnx"]
