"""Run a job file, doing only what is stale — the unattended (cron) entry point.

For every data folder x backbone: extract (always incremental; a no-op when nothing
changed), then fit each head unless the head on disk was fitted on exactly this cache
content with exactly these settings, then fine-tune unless the model on disk came from
this very head file with these options (an unfinished fine-tune resumes). A second run
of an unchanged job does no work and says so.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..backbones import HubTrust
from ..errors import ExitCode, FeatcacheError
from ..finetune import FinetuneOptions
from ..store import WriterLock, atomic_path
from .spec import BackboneSpec, HeadSpec, JobSpec, load_job

logger = logging.getLogger(__name__)


@dataclass
class Step:
    kind: str  # extract | fit-head | finetune
    target: str  # cache, head or model path
    action: str  # "run", "skip" (up to date), "resume", "start over"
    reason: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    job: str
    name: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    failed_inputs: int = 0
    did_work: bool = False
    dry_run: bool = False
    report: str = ""
    error: dict[str, Any] | None = None  # what stopped the job: message, type, exit_code, step
    audit: dict[str, dict[str, int]] = field(default_factory=dict)  # cache -> the audit's counts (label-errors, duplicates, leaks, ...)
    running: tuple[Step, float] | None = field(default=None, repr=False)  # the step under way and when it began (not reported)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("running")
        return d

    def begin(self, kind: str, target: str, action: str, reason: str) -> None:
        self.running = (Step(kind, target, action, reason), time.perf_counter())

    def finish(self, step: Step) -> None:
        self.steps.append(step)
        self.running = None

    def fail(self, exc: BaseException) -> None:
        """Record the error that stopped the job, and the step it stopped as a "failed" step."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        code = getattr(exc, "exit_code", ExitCode.INTERRUPTED if interrupted else ExitCode.INTERNAL)
        self.error = {"message": str(exc) or ("interrupted" if interrupted else type(exc).__name__), "type": type(exc).__name__, "exit_code": code,
                      "step": None}
        if self.running is not None:
            step, t0 = self.running
            self.error["step"] = step.kind
            self.steps.append(Step(step.kind, step.target, "failed", step.reason, round(time.perf_counter() - t0, 3),
                                   {"planned": step.action, "error": self.error["message"], "error_type": self.error["type"], "exit_code": code}))
            self.running = None


# ----------------------------------------------------------------------------- where things go


def cache_paths_for(job: JobSpec, data_root: Path, backbone: BackboneSpec) -> list[Path]:
    """The caches a ``[[backbones]]`` entry fills: one, or one per tapped ``layers`` entry."""
    from ..backbones import choose_precision
    from ..devices import resolve_device
    from ..extract import cache_paths

    precision = choose_precision(backbone.options.precision, resolve_device(job.device)).name  # what this machine runs
    return cache_paths(backbone.model, backbone.options, data_root, None, precision, job.cache_dir)


def artifact_dir_for(job: JobSpec, cache: Path, head_name: str) -> Path:
    """``<out_dir>/<cache>/<head>/``: one folder per backbone and head, holding the head, the
    model fine-tuned from it, and their reports (names checked to be one path component)."""
    return job.out_dir / cache.stem / head_name


def head_path_for(job: JobSpec, cache: Path, head: HeadSpec) -> Path:
    return artifact_dir_for(job, cache, head.name) / "head.pt"


def model_path_for(job: JobSpec, cache: Path, head_name: str) -> Path:
    return artifact_dir_for(job, cache, head_name) / "finetuned.pt"


# ----------------------------------------------------------------------------- staleness


def head_staleness(head_path: Path, cache: Path, spec: HeadSpec) -> str | None:
    """None when the head on disk is up to date, else why it must be (re)fitted."""
    from ..heads import load_head
    from ..store import read_rows

    if not head_path.is_file():
        return "not fitted yet"
    if not cache.exists():
        return "its cache does not exist yet"
    try:
        prov = load_head(head_path).provenance
    except FeatcacheError:
        return "the head file is unreadable"
    if prov.get("job_spec") != spec.digest():
        return "its settings in the job file changed"
    if prov.get("cache_fingerprint") != read_rows(cache).content_digest():
        return "its cache changed since it was fitted"
    return None


def finetune_plan(model_path: Path, head_path: Path, options: FinetuneOptions) -> tuple[str, str]:
    """("skip" | "resume" | "start over" | "run", reason) for a fine-tune from ``head_path``."""
    from ..finetune import RESUME_MAY_CHANGE, checkpoint_path_for, load_checkpoint, resolve_options
    from ..heads import artifact_id

    if not head_path.is_file():
        return "run", "its head is fitted in this run"
    wanted = resolve_options(options)
    ckpt = checkpoint_path_for(model_path)
    if ckpt.is_file():
        try:
            state = load_checkpoint(ckpt)
            fixed = lambda opts: {k: v for k, v in opts.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
            same = state["identity"]["head_sha256"] == artifact_id(head_path) and fixed(state["options"]) == fixed(wanted.training())
            done = int(state["epoch"])
        except (FeatcacheError, KeyError):
            return "start over", "its checkpoint is unreadable"
        if same and done >= wanted.epochs and model_path.is_file():
            return "skip", f"up to date ({done} epochs from this head)"
        if same and done < wanted.epochs:
            return "resume", f"its checkpoint stopped after {done} of {wanted.epochs} epochs"
        return "start over", "its head or options changed"
    if wanted.epochs == 0 and model_path.is_file():
        return "start over", "evaluation only"
    return "run", "not fine-tuned yet"


# ----------------------------------------------------------------------------- running


def run_job(path: str | Path, overrides: list[str] | None = None, *, force: bool = False, dry_run: bool = False, wait: float = 0.0,
            device: str | None = None, workers: int | None = None,
            progress: Callable[[str], Callable[[int, int, float], None] | None] = lambda label: None, trust_hub: bool = False) -> JobResult:
    """Validate the job file, then run its stale steps in order (or only plan them: ``dry_run``).

    A failing step stops the job (work already committed stays); the error propagates, and
    ``<name>.run.json`` records it as a "failed" step (plus ``error``), with ``completed`` false.
    ``trust_hub`` (``run --trust-hub``) is needed only where a file names a ``hub:`` backbone the
    job file does not (see ``hub_consent``).
    """
    job = load_job(path, overrides)
    if device is not None:
        job.device = device
    if workers is not None:
        job.workers = workers
    result = JobResult(str(job.path), job.name, dry_run=dry_run)
    t0 = time.perf_counter()
    if dry_run:
        _plan(job, result, force)
    else:
        with WriterLock(job.path, command=f"run {job.path.name}", wait=wait):
            try:
                _execute(job, result, force, wait, progress, hub_consent(job, trust_hub))
            except BaseException as exc:
                result.seconds = round(time.perf_counter() - t0, 3)
                result.fail(exc)
                try:  # record how far it got, without hiding the error itself
                    _write_report(job, result, failed=True)
                except FeatcacheError:
                    pass
                raise
            result.seconds = round(time.perf_counter() - t0, 3)
            result.report = str(_write_report(job, result))
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _plan(job: JobSpec, result: JobResult, force: bool) -> None:
    from ..status import cache_status

    for root in job.data:
        for bb in job.backbones:
            for cache in cache_paths_for(job, root, bb):
                if cache.exists():
                    st = cache_status(cache)
                    pending = st.get("not_extracted")
                    reason = f"{pending} new file(s), {st.get('gone_from_disk', 0)} gone" if pending is not None else "data folder problem"
                    action = "run" if pending or st.get("gone_from_disk") else "skip"
                else:
                    action, reason = "run", "no cache yet"
                result.steps.append(Step("extract", str(cache), action, reason))
                for h in job.heads:
                    head = head_path_for(job, cache, h)
                    why = "--force" if force else head_staleness(head, cache, h)
                    result.steps.append(Step("fit-head", str(head), "run" if why else "skip", why or "up to date"))
                if job.finetune is not None:
                    head = head_path_for(job, cache, next(h for h in job.heads if h.name == job.finetune.from_head))
                    action, reason = ("start over", "--force") if force else finetune_plan(model_path_for(job, cache, job.finetune.from_head), head, job.finetune.options)
                    result.steps.append(Step("finetune", str(model_path_for(job, cache, job.finetune.from_head)), action, reason))
    result.did_work = any(s.action != "skip" for s in result.steps)


def _extract_groups(job: JobSpec) -> list[list[BackboneSpec]]:
    """Backbones that share weights and extract options: one pass over the files for each group."""
    groups: dict[str, list[BackboneSpec]] = {}
    for bb in job.backbones:
        key = json.dumps(asdict(bb.options), sort_keys=True, default=str)
        groups.setdefault(key, []).append(bb)
    return list(groups.values())


def hub_consent(job: JobSpec, trust_hub: bool) -> HubTrust:
    """What the job's stages may run: a job file is the user's own instruction, like a command
    line, so the ``hub:`` sources its backbones name are consent for its own stages (the fine-tune
    of its heads); a file naming another source needs ``run --trust-hub``."""
    return True if trust_hub else tuple(bb.model for bb in job.backbones)


def _execute(job: JobSpec, result: JobResult, force: bool, wait: float, progress, consent: HubTrust) -> None:
    from ..extract import extract_many

    for root in job.data:
        for group in _extract_groups(job):
            per_model = [cache_paths_for(job, root, bb) for bb in group]
            caches = [c for paths in per_model for c in paths]
            for bb, paths in zip(group, per_model):
                logger.info(f"[{job.name}] extract {root} with {bb.model} ({bb.weights}) -> {', '.join(map(str, paths))}")
            t = time.perf_counter()
            result.begin("extract", ", ".join(map(str, caches)), "run", "incremental extraction")
            opts = group[0].options
            summaries = extract_many(root, [bb.model for bb in group], per_model, opts, device=job.device,
                                     workers=opts.workers if opts.workers is not None else job.workers, wait=wait, progress=progress("extract"),
                                     trust_hub=consent)
            seconds = round(time.perf_counter() - t, 3)
            for cache, s in zip(caches, summaries):
                changed = bool(s.new or s.removed or s.new_failed)
                result.finish(Step("extract", str(cache), "run" if changed else "skip",
                                   f"{s.new} new, {s.removed} removed, {s.new_failed} newly failed" if changed else "up to date (no new, changed or removed files)",
                                   seconds, {k: v for k, v in s.to_dict().items() if k not in ("failures", "skipped")}))
                result.failed_inputs += s.failed
                logger.info(f"[{job.name}]   {s.model}: {s.new} new, {s.cached} cached, {s.failed} failed, {s.removed} removed")
            for cache in caches:
                _fit_and_finetune(job, cache, result, force, wait, progress, consent)
    result.did_work = any(s.action != "skip" for s in result.steps)
    if not result.did_work:
        logger.info(f"[{job.name}] nothing to do: every cache, head and model is up to date")


def audit_path_for(job: JobSpec, cache: Path) -> Path:
    """``<out_dir>/<cache>/audit.json``: the last audit of a cache (its counts go into run.json)."""
    return job.out_dir / cache.stem / "audit.json"


class _CacheAudit:
    """The audit of one cache, run once for all its heads' reports (and only when one is written);
    its counts are kept in ``audit.json`` so a run with nothing stale still reports them."""

    def __init__(self, job: JobSpec, cache: Path):
        self.job, self.cache, self.audit = job, cache, None

    def get(self):
        from ..quality import audit_cache

        if self.audit is None:
            self.audit = audit_cache(self.cache)
            with atomic_path(audit_path_for(self.job, self.cache)) as tmp:
                tmp.write_text(json.dumps({"cache": str(self.cache), "counts": self.audit.counts(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return self.audit

    def counts(self) -> dict[str, int] | None:
        if self.audit is not None:
            return self.audit.counts()
        try:
            return json.loads(audit_path_for(self.job, self.cache).read_text())["counts"]
        except (OSError, ValueError, KeyError):
            return None


def _fit_and_finetune(job: JobSpec, cache: Path, result: JobResult, force: bool, wait: float, progress,
                      consent: HubTrust) -> None:
    """The heads of one cache (and their reports), then the fine-tune that starts from one of them: each only when stale."""
    audit = _CacheAudit(job, cache)
    try:
        _fit_heads(job, cache, result, force, wait, audit)
    finally:
        counts = audit.counts() if job.report else None
        if counts is not None:
            result.audit[str(cache)] = counts
    if job.finetune is not None:
        _finetune(job, cache, result, force, wait, progress, audit, consent)


def _fit_heads(job: JobSpec, cache: Path, result: JobResult, force: bool, wait: float, audit: _CacheAudit) -> None:
    from ..heads import fit_head

    for h in job.heads:
        head = head_path_for(job, cache, h)
        why = "--force" if force else head_staleness(head, cache, h)
        if not why:
            result.steps.append(Step("fit-head", str(head), "skip", "up to date"))
            logger.info(f"[{job.name}] fit-head {h.name}: up to date ({head})")
            continue
        logger.info(f"[{job.name}] fit-head {h.name} ({why}) -> {head}")
        t = time.perf_counter()
        result.begin("fit-head", str(head), "run", why)
        r = fit_head(cache, h.options, head, wait=wait, title=h.name, extra_provenance={"job_spec": h.digest(), "job": str(job.path)})
        if job.report:
            from ..report import write_report

            r.reports["report_html"] = write_report(head, audit=audit.get()).path
        m = r.metrics.get("val") or r.metrics.get("test") or {}
        result.finish(Step("fit-head", str(head), "run", why, round(time.perf_counter() - t, 3),
                           {"val_accuracy": m.get("accuracy"), "n_train": r.n_train, "reports": r.reports}))
        logger.info(f"[{job.name}]   fitted on {r.n_train} rows" + (f", val accuracy {m['accuracy']:.4f}" if m else ""))


def _finetune(job: JobSpec, cache: Path, result: JobResult, force: bool, wait: float, progress, audit: _CacheAudit,
              consent: HubTrust) -> None:
    """The fine-tune (when stale), and its report when the job writes reports (the cache's audit reused)."""
    from ..finetune import run_finetune

    ft = job.finetune
    head = head_path_for(job, cache, next(h for h in job.heads if h.name == ft.from_head))
    model = model_path_for(job, cache, ft.from_head)
    action, reason = ("start over", "--force") if force else finetune_plan(model, head, ft.options)
    if action == "skip":
        result.steps.append(Step("finetune", str(model), "skip", reason))
        logger.info(f"[{job.name}] finetune: {reason} ({model})")
        return
    logger.info(f"[{job.name}] finetune from head {ft.from_head!r} ({reason}) -> {model}")
    t = time.perf_counter()
    result.begin("finetune", str(model), action, reason)
    r = run_finetune(head, model, options=ft.options, resume=action == "resume", force=action != "resume",
                     workers=ft.options.workers if ft.options.workers is not None else job.workers, device=job.device, wait=wait,
                     progress=progress("train"), trust_hub=consent)
    result.failed_inputs += len(r.failures)
    if job.report:
        from ..report import write_report

        r.reports["report_html"] = write_report(model, audit=audit.get()).path
    val = r.metrics.get("val", {})
    result.finish(Step("finetune", str(model), action, reason, round(time.perf_counter() - t, 3),
                       {"best_epoch": r.best_epoch, "epochs_done": r.epochs_done, "val_accuracy": val.get("accuracy"), "reports": r.reports}))


def _write_report(job: JobSpec, result: JobResult, failed: bool = False) -> Path:
    """``<out_dir>/<name>.run.json``: what the last run did (for monitoring)."""
    target = job.out_dir / f"{job.name}.run.json"
    entry = {**result.to_dict(), "completed": not failed, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(entry, indent=2, default=str))
    return target
