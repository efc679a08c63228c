"""Batch jobs: the job file (TOML, every problem reported before any work starts) and
running only what is stale: extract, fit each head, fine-tune (for cron).

Never holds stage logic: each step calls its stage with that stage's options object.
"""
from .runner import JobResult, Step, run_job
from .spec import JobFileError, JobSpec, load_job

__all__ = ["JobFileError", "JobResult", "JobSpec", "Step", "load_job", "run_job"]
