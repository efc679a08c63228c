"""Stage 3: a stage-2 head bolted onto its backbone and trained end to end with BatchNorm
frozen (running statistics untouched, affine parameters not trained): options, augmentation,
the assembled model, the training loop, checkpoints and bit-exact resume.

Never re-implements a head: it starts from the head artifact stage 2 wrote.
"""
from .options import DEFAULTS, RESUME_MAY_CHANGE, FinetuneOptions, resolve_options
from .run import FineTuneResult, checkpoint_path_for, load_checkpoint, run_finetune

__all__ = ["DEFAULTS", "RESUME_MAY_CHANGE", "FineTuneResult", "FinetuneOptions", "checkpoint_path_for", "load_checkpoint", "resolve_options",
           "run_finetune"]
