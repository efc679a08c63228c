"""``write_report``: one self-contained HTML file about a head (or fine-tuned model) and its data.

What it reads: the artifact (provenance, hyper-parameters, metrics, training history) and a
cache (the head's own by default; ``--cache`` another of the same backbone, refused when it
is not: the check ``evaluate`` and ``predict`` use). From the cache's embeddings it scores
the head again (metrics, confusion, mistakes with their nearest training rows) and runs the
audit (label errors, near-duplicates and leaks judged by the head's own split, imbalance,
failed files) and the 2-D map. Images are read only for thumbnails.

A fine-tuned model has no cache of its own backbone unless one was extracted with it
(``extract DATA --model MODEL.pt``, then ``--cache``): without one, its metrics, confusion
and curves come from the artifact, and the data sections from its base head's cache.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UsageError, command_hint
from ..heads import LoadedHead, Scored, load_head, score_chunk_rows, score_head, split_as_recorded
from ..memory import return_freed_memory
from ..quality import Audit, ReportOptions, advice, audit_projected, cache_rows, check_map_method, embedding_map, project, rows_of, top_k
from ..store import CacheData, RowTable, atomic_path, read_rows
from . import sections
from .html import page
from .thumbnails import Thumbnails

logger = logging.getLogger(__name__)


@dataclass
class ReportResult:
    path: str
    artifact: str
    cache: str | None
    seconds: float
    counts: dict[str, int]
    advice: list[str]
    metrics: dict[str, dict[str, Any]]  # split -> accuracy, top5_accuracy, macro_f1, log_loss
    mistakes: int
    thumbnails: int
    missing_images: int
    notes: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # facts beside the advice (the most frequent confusions; nothing stands out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_report_path(artifact: str | os.PathLike) -> Path:
    """``heads/x.logreg.head.pt`` -> ``heads/x.logreg.head.report.html`` (beside its other reports)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name.removesuffix(".pt") + ".report.html")


def _cache_for(loaded: LoadedHead, cache: str | os.PathLike | None) -> tuple[Path | None, bool, str]:
    """(cache to read, whether the artifact is scored on it, a note)."""
    prov = loaded.provenance
    if cache is not None:
        return Path(cache), True, ""
    if "base_head" in prov:  # a fine-tuned model: its backbone has no cache of its own
        base = Path(prov["base_head"])
        if base.is_file():
            base_cache = load_head(base).provenance.get("cache")
            if base_cache and Path(base_cache).exists():
                return Path(base_cache), False, (f"per-image predictions need a cache of the fine-tuned backbone: "
                                                 f"`{command_hint(f'extract DATA --model {loaded.path}')}`, then `report {loaded.path} --cache THAT`; "
                                                 f"the data sections use its base head's cache {base_cache}")
        return None, False, "its base head's cache is gone: the data sections are left out (pass --cache a cache extracted with this model)"
    own = Path(str(prov.get("cache", "")))
    if not own.exists():
        raise UsageError(f"head {str(loaded.path)!r} was fitted on cache {str(own)!r}, which is gone; pass --cache CACHE (a cache of the same backbone and classes)")
    return own, True, ""


def write_report(artifact: str | os.PathLike, cache: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 options: ReportOptions | None = None, *, audit: Audit | None = None) -> ReportResult:
    """Write the report of ``artifact`` (a head or fine-tuned model) to ``out`` (default: beside
    it, ``*.report.html``) atomically. ``audit``: one already run on the same cache (a job
    reuses it for every head of a cache).

    Raises:
        UsageError (missing files, bad options), IncompatibleError (a cache of another backbone,
        weights or classes), CacheError, StorageError.
    """
    t0 = time.perf_counter()
    opts = options or ReportOptions()
    check_map_method(opts.map)
    artifact = Path(artifact)
    loaded = load_head(artifact)
    out_path = Path(out) if out is not None else default_report_path(artifact)
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {str(out_path)!r}: the report is an HTML file; name it *.html")
    if out_path.is_dir():
        raise UsageError(f"--out {str(out_path)!r} is a folder; name the report file, e.g. {out_path / 'report.html'}")
    cache_path, scored_here, note = _cache_for(loaded, cache)
    notes = [note] if note else []
    view: dict[str, Any] = {"loaded": loaded, "options": opts, "notes": notes, "cache": cache_path, "scored": None, "audit": None}
    if cache_path is not None:
        with read_rows(cache_path) as table:
            view.update(_read_and_audit(table, cache_path, loaded, scored_here, opts, audit))
    result = _render(view, out_path)
    result.seconds = round(time.perf_counter() - t0, 3)
    logger.info(f"report: {out_path} ({result.thumbnails} thumbnails, {result.missing_images} missing) in {result.seconds:.1f}s")
    return result


def _read_and_audit(table: RowTable, cache_path: Path, loaded: LoadedHead, scored_here: bool, opts: ReportOptions, audit: Audit | None) -> dict[str, Any]:
    """The head scored on the cache's rows, the audit (``audit``'s when it is of this cache),
    the map: everything the data sections show. Over ``--memory-budget`` the embeddings are
    read a chunk at a time and the projected rows spilled to disk, as ``audit`` does, and only
    the misclassified rows' probabilities are kept: memory follows what is shown, not N."""
    prov = loaded.provenance
    if scored_here:
        loaded.check_cache(table.meta, cache_path)
    classes = list(table.classes)
    failures = sorted((p, r) for p, r, _, _ in table.snapshot.failure_columns().items())
    data = CacheData(cache_path, None, table.labels, table.paths, classes, table.split, failures, dict(table.meta), table.fingerprints)
    same_data = table.meta.get("data_root") == prov.get("data_root")
    split = split_as_recorded(prov, table.paths, table.labels, table.split)
    X, budget, order = cache_rows(table, opts, "report")
    view: dict[str, Any] = {"data": data}
    if scored_here:
        chunk = score_chunk_rows(budget, X.shape[1], len(classes))
        view["scored"] = score_head(loaded, lambda rows: X[rows], table.labels, split, same_data, classes, keep="mistakes", chunk_rows=chunk)
        if same_data:
            view["stale"] = table.content_digest() != prov.get("cache_fingerprint")
        logger.info(f"report: scored {sum(len(r) for r in view['scored'].groups.values())} rows of {cache_path}")
    reuse = audit is not None and Path(audit.cache).resolve() == cache_path.resolve() and len(audit.paths) == len(table.paths)
    if not reuse:
        rows = project(X, opts.dims, budget, cache_path, order)
        del X  # scored and projected: the checks need only the projected rows (one copy of the embeddings at the peak)
        return_freed_memory()
        audit = audit_projected(rows, table.labels, split, table.paths, classes, opts, sha256=table.fingerprints.get("sha256"), failures=failures)
        audit.cache = str(cache_path)
    view["audit"] = audit.judged_by(split)
    view["map"] = embedding_map(audit.space, audit.whitened, opts.map, max_points=opts.map_points, seed=opts.seed) if audit.space is not None else None
    view["thumbs"] = Thumbnails(data.meta, opts.thumb_size)
    return view


def _mistakes(view: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(group, rows, their probabilities, predicted) of the misclassified rows, worst first
    (lowest probability of the true class)."""
    scored: Scored | None = view["scored"]
    if scored is None:
        return "", np.zeros(0, dtype=np.int64), np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    group = next((g for g in ("val", "all", "test") if g in scored.groups), "")
    if not group:
        return "", np.zeros(0, dtype=np.int64), np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    rows, proba = scored.kept[group], scored.proba[group]
    labels = view["data"].labels[rows]
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    order = wrong[np.argsort(proba[wrong, labels[wrong]], kind="stable")]
    return group, rows[order], proba[order], pred[order]


def _without_confusions(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The metrics the advice reads, less the confusion matrix: its most frequent pair is a fact,
    shown beside the advice (and in full under Metrics), not something to do."""
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "confusion_matrix"}


def _advice_and_findings(items: list[str]) -> tuple[list[str], list[str]]:
    """(advice, facts) of ``quality.advice``'s sentences: every item kept as advice says what to
    do; a count with nothing to do gets its pointer, and "nothing stands out" is a finding."""
    todo, facts = [], []
    for item in items:
        if item.startswith("nothing stands out"):
            facts.append(item[0].upper() + item[1:] + ".")
        elif " more suspected label error" in item and ":" not in item:
            todo.append(item + ": check them under Likely label errors below")
        else:
            todo.append(item)
    return todo, facts


def _render(view: dict[str, Any], out_path: Path) -> ReportResult:
    loaded: LoadedHead = view["loaded"]
    opts: ReportOptions = view["options"]
    audit: Audit | None = view["audit"]
    scored: Scored | None = view["scored"]
    metrics = scored.metrics if scored is not None else {s: loaded.metrics[s] for s in ("val", "test") if s in loaded.metrics}
    main_split = next((s for s in ("val", "all", "test") if metrics.get(s)), "val")
    main_metrics = metrics.get(main_split)
    todo, findings = _advice_and_findings(advice(audit, _without_confusions(main_metrics)) if audit is not None else [])
    confused = sections.confusions_line(main_metrics["confusion_matrix"], list(main_metrics["per_class"]), main_split) if main_metrics else ""
    findings = ([confused] if confused else []) + findings
    group, m_rows, m_proba, m_pred = _mistakes(view)
    neighbours = None
    if len(m_rows) and opts.neighbours and scored is not None and len(scored.train) and audit is not None and audit.unit is not None:
        shown = m_rows[: opts.max_images]
        idx, sims = top_k(audit.unit[shown], rows_of(audit.unit, scored.train), opts.neighbours, device=opts.device)
        neighbours = (scored.train[idx], sims)
    title = f"featcache report: {loaded.path.name}"
    subtitle = (f"{loaded.kind} {'fine-tuned model' if 'base_head' in loaded.provenance else 'head'} on {loaded.provenance.get('model')} "
                f"({loaded.provenance.get('weights')}) · generated {time.strftime('%Y-%m-%d %H:%M:%S')} by featcache {__version__}")
    parts = [
        ("summary", "Summary", sections.summary(main_metrics, audit, todo, view["notes"], main_split, findings)),
        ("provenance", "Provenance", sections.provenance(loaded, view)),
        ("metrics", "Metrics", sections.metrics(loaded, metrics, view)),
    ]
    if view["cache"] is not None:
        parts += [
            ("mistakes", "Mistakes", sections.mistakes(view, group, m_rows, m_proba, m_pred, neighbours)),
            ("label-errors", "Label errors", sections.label_errors(view)),
            ("duplicates", "Duplicates & leaks", sections.duplicates(view)),
            ("map", "Map", sections.embedding_map(view, m_rows)),
            ("data", "Data", sections.data(view)),
        ]
    html_text = page(title, subtitle, parts)
    data = html_text.encode("utf-8")
    with atomic_path(out_path, len(data)) as tmp:
        tmp.write_bytes(data)
    thumbs: Thumbnails | None = view.get("thumbs")
    made = thumbs.made if thumbs else 0
    return ReportResult(str(out_path), str(loaded.path), str(view["cache"]) if view["cache"] else None, 0.0, audit.counts() if audit else {}, todo,
                        {s: {k: m.get(k) for k in ("n", "accuracy", "top5_accuracy", "macro_f1", "log_loss")} for s, m in metrics.items()},
                        int(len(m_rows)), made, len(thumbs.missing) if thumbs else 0, view["notes"], findings)
