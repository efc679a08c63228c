"""Stage 2: heads behind one scikit-learn estimator contract (logreg, linear, mlp), fitted on
a cache (in memory or streamed), the train/val/test split, the metrics and plots, and the
head and model artifacts with their provenance, checked against a cache on load.

Never reads images: everything here works on cached embeddings.
"""
from .artifacts import LoadedHead, artifact_id, load_head, save_blob, save_model_artifact
from .estimators import HEAD_KINDS, LinearHead, LogRegHead, MLPHead, TorchHead, build_head_module
from .evaluation import Scored, evaluate_head, score_chunk_rows, score_head
from .fit import compare_caches, fit_head, full_proba
from .knn import KNNHead
from .logreg_path import stratified_subsample
from .metrics import (
                      CELL_LABEL_MAX_CLASSES,
                      RunningMetrics,
                      classification_metrics,
                      clear_reports,
                      confusion_figure,
                      format_metrics,
                      history_figure,
                      kept_epoch,
                      literal_text,
                      pyplot,
                      save_figure,
                      top_confusions,
                      write_reports,
)
from .options import FitOptions
from .scoring import head_scorer
from .splits import assign_splits, recorded_rule, split_as_recorded

__all__ = ["CELL_LABEL_MAX_CLASSES", "HEAD_KINDS", "FitOptions", "KNNHead", "LinearHead", "LoadedHead", "LogRegHead", "MLPHead", "RunningMetrics", "TorchHead", "artifact_id", "assign_splits", "recorded_rule", "split_as_recorded", "build_head_module",
           "classification_metrics", "clear_reports", "compare_caches", "confusion_figure", "evaluate_head", "score_chunk_rows", "score_head", "stratified_subsample", "Scored", "fit_head", "format_metrics", "full_proba", "head_scorer",
           "history_figure", "kept_epoch", "literal_text", "load_head", "pyplot",
           "save_blob", "save_figure", "save_model_artifact", "top_confusions", "write_reports"]
