"""Plain-text summaries of caches for terminals and JSON for machines (no training here)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, command_hint
from .images import scan_source
from .names import printable
from .store import cache_disk_bytes, encode_paths, read_index_info, read_rows, verify_cache


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_status(path: str | os.PathLike, check_disk: bool = True, verify: bool = True) -> dict[str, Any]:
    """What a cache holds: rows, classes with counts, splits, failures, provenance, freshness
    (numpy over the rows: no Python object per row), and with ``verify`` whether every part is
    exactly what was written (its SHA-256: reads every byte once)."""
    path = Path(path)
    with read_rows(path) as table:
        meta = table.meta
        classes = list(meta["classes"])
        counts = np.bincount(table.labels + 1, minlength=len(classes) + 1)  # slot 0: unlabeled (-1)
        per_class = {c: int(counts[i + 1]) for i, c in enumerate(classes)}
        names, n = np.unique(table.split, return_counts=True)
        splits = {(str(k) or "(none)"): int(v) for k, v in zip(names, n)}
        info = read_index_info(path)
        failures, updated = info["failures"], info["updated"]
        status: dict[str, Any] = {
            "cache": str(path),
            "rows": len(table),
            "embed_dim": meta["embed_dim"],
            "dtype": meta["dtype"],
            "classes": per_class,
            "unlabeled": int(counts[0]),
            "splits": splits,
            "failed": len(failures),
            "failures": [{"path": p, "reason": r} for p, r in failures],
            "parts": info["parts"],
            "schema_version": info["schema_version"],
            "generation": info["generation"],
            "largest_part_rows": info["largest_part_rows"],
            "deleted_rows": info["deleted_rows"],
            "retired_files": info["garbage_files"],
            "bytes_on_disk": cache_disk_bytes(path),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(updated)),
            "provenance": meta,
        }
        if verify:
            report = verify_cache(path)
            status["integrity"] = {"ok": report.ok, "damaged": report.damaged, "seconds": round(report.seconds, 2)}
        if check_disk and meta.get("data_root"):  # a cache written by other code may have no data folder
            try:
                scan = scan_source(meta["data_root"], meta["layout"], meta.get("manifest_columns"))
                on_disk = encode_paths([r.relpath for r in [*scan.records, *scan.failed]])  # what extract records as failed too
                have = np.concatenate([table.paths_raw, encode_paths([p for p, _ in failures])])
                status["not_extracted"] = int((~np.isin(on_disk, have)).sum())
                status["gone_from_disk"] = int((~np.isin(have, on_disk)).sum())
            except DataError as exc:
                status["not_extracted"] = None
                status["data_root_problem"] = str(exc)
    return status


def _preprocessing_line(pre: dict[str, Any] | None) -> str:
    """The preprocessing as one line; a cache written by other code may record none, or other keys."""
    if not pre or "resize_size" not in pre:
        return f"preprocess {json.dumps(pre) if pre else '(not recorded)'}"
    return (f"preprocess resize={pre['resize_size']} crop={pre.get('crop_size')} {pre.get('interpolation', '')} mean={pre.get('mean')} std={pre.get('std')}"
            + (f" {pre['input_space']}" if pre.get("input_space", "RGB") != "RGB" else "")
            + (f" range 0-{pre['input_range']:g}" if pre.get("input_range", 1.0) != 1.0 else ""))


def format_cache_status(s: dict[str, Any]) -> str:
    meta = s["provenance"]
    pre = meta.get("preprocessing")
    lines = [
        f"cache      {printable(s['cache'])}",
        f"backbone   {meta['model']}  weights={meta['weights']}  embed_dim={s['embed_dim']} {s['dtype']}  "
        f"({meta.get('precision', 'fp32')}, engine {meta.get('engine', 'eager')}, decode {meta.get('decode', 'exact')})",
        _preprocessing_line(pre),
        *([f"layer      {meta['layer']}  (pooled: {meta.get('layer_pool')})"] if meta.get("layer") else []),
        f"data root  {printable(meta['data_root'])}  (layout {meta['layout']})",
        f"rows       {s['rows']}  in {s['parts']} part(s) (schema {s['schema_version']}, version {s['generation']}), "
        f"{human_bytes(s['bytes_on_disk'])} on disk, updated {s['updated']}",
        f"splits     {', '.join(f'{k}={v}' for k, v in s['splits'].items()) or '-'}",
        f"classes    {len(s['classes'])}" + (f"  (+{s['unlabeled']} unlabeled)" if s["unlabeled"] else ""),
    ]
    shown = {printable(c): n for c, n in s["classes"].items()}  # a newline in a class name must not start a line
    width = max((len(c) for c in shown), default=0)
    lines += [f"  {c:<{width}}  {n}" for c, n in shown.items()]
    if s.get("not_extracted") is not None:
        lines.append(f"pending    {s['not_extracted']} file(s) on disk not yet extracted, {s.get('gone_from_disk', 0)} gone from disk")
    elif s.get("data_root_problem"):
        lines.append(f"pending    unknown: {printable(s['data_root_problem'])}")
    lines.append(f"failed     {s['failed']}")
    lines += [f"  {printable(f['path'])}: {printable(f['reason'])}" for f in s["failures"][:20]]
    if s["failed"] > 20:
        lines.append(f"  ... and {s['failed'] - 20} more (see --json)")
    integrity = s.get("integrity")
    if integrity is None:
        lines.append("integrity  not checked (--no-verify)")
    elif integrity["ok"]:
        lines.append(f"integrity  ok: every part is exactly what was written ({integrity['seconds']:.1f}s)")
    else:
        lines += [f"integrity  DAMAGED {d['part']}: {d['problem']}" for d in integrity["damaged"]]
    lines.append(f"versions   featcache {meta.get('featcache_version')}, torch {meta.get('torch_version')}, torchvision {meta.get('torchvision_version')}")
    return "\n".join(lines)


def artifact_status(path: str | os.PathLike) -> dict[str, Any]:
    """What a head (or fine-tuned model) was fitted on, how well, and whether it is stale:
    its cache changed since (heads), or its base head changed since (fine-tuned models)."""
    from .errors import FeatcacheError
    from .heads import artifact_id, load_head

    loaded = load_head(path)
    prov = loaded.provenance
    finetuned = "base_head" in prov
    val = loaded.metrics.get("val") or loaded.metrics.get("test") or {}
    status: dict[str, Any] = {
        "artifact": str(path), "kind": "fine-tuned model" if finetuned else f"{loaded.kind} head", "head": loaded.kind,
        "model": prov.get("model"), "weights": prov.get("weights"), "embed_dim": prov.get("embed_dim"), "classes": prov.get("classes"),
        "data_root": prov.get("data_root"), "fitted_at": prov.get("fitted_at"), "n_train": prov.get("n_train"), "n_val": prov.get("n_val"),
        "val_accuracy": val.get("accuracy"), "val_macro_f1": val.get("macro_f1"), "provenance": prov,
    }
    if finetuned:
        base = Path(prov["base_head"])
        status["base_head"] = str(base)
        status["epoch"] = prov.get("epoch")
        if not base.is_file():
            status["stale"], status["why"] = None, f"its base head {str(base)!r} is gone"
        else:
            changed = artifact_id(base) != prov.get("base_head_sha256")
            status["stale"], status["why"] = changed, ("its base head was refitted since" if changed else "base head unchanged")
        return status
    cache = Path(prov.get("cache", ""))
    status["cache"] = str(cache)
    if not cache.exists():
        status["stale"], status["why"] = None, f"its cache {str(cache)!r} is gone"
    else:
        try:
            table = read_rows(cache)
            changed = table.content_digest() != prov.get("cache_fingerprint")
            status["cache_rows_now"] = len(table.paths)
            status["stale"] = changed
            status["why"] = (f"the cache changed since it was fitted ({len(table.paths)} rows now)" if changed else "cache unchanged since fitted")
        except FeatcacheError as exc:
            status["stale"], status["why"] = None, f"its cache cannot be read: {exc}"
    return status


def format_artifact_status(s: dict[str, Any]) -> str:
    acc = f"{s['val_accuracy']:.4f}" if s.get("val_accuracy") is not None else "-"
    stale = {True: "STALE", False: "up to date", None: "unknown"}[s.get("stale")]
    lines = [
        f"artifact   {printable(s['artifact'])}  ({s['kind']})",
        f"backbone   {s['model']}  weights={s['weights']}  embed_dim={s['embed_dim']}",
        f"classes    {len(s['classes'] or [])}: {', '.join(printable(c) for c in (s['classes'] or [])[:10])}{' …' if len(s['classes'] or []) > 10 else ''}",
        f"data root  {printable(s['data_root'])}",
        f"fitted     {s['fitted_at']}  on {s['n_train']} train rows; val accuracy {acc} on {s['n_val']} rows",
    ]
    if "cache" in s:
        lines.append(f"cache      {s['cache']}")
    if "base_head" in s:
        lines.append(f"base head  {s['base_head']}  (best epoch {s.get('epoch')})")
    lines.append(f"status     {stale}: {printable(s['why'])}")
    return "\n".join(lines)


def onnx_status(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """What a model written by ``export-model`` holds: its metadata (classes, preprocessing,
    provenance of backbone and head, featcache version), its input and output, and with
    ``verify`` whether its graph is what was exported (a damaged one is exit 5)."""
    from .serving import read_onnx

    model, meta = read_onnx(path, verify=verify)
    graph = model.graph
    inits = {t.name for t in graph.initializer}

    def signature(values) -> list[dict[str, Any]]:
        return [{"name": v.name, "type": v.type.tensor_type.elem_type,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values if v.name not in inits]

    return {"artifact": str(path), "kind": "ONNX model", "bytes": Path(path).stat().st_size, "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "inputs": signature(graph.input), "outputs": signature(graph.output), "integrity": "ok" if verify else "not checked", **meta}


def format_onnx_status(s: dict[str, Any]) -> str:
    prov, pre = s.get("provenance") or {}, s.get("preprocessing") or {}
    classes = s.get("classes") or []
    exported = prov.get("exported") or {}
    check = exported.get("check") or {}
    acc = f"{prov['val_accuracy']:.4f}" if prov.get("val_accuracy") is not None else "-"
    io = lambda vs: ", ".join(f"{v['name']} {v['shape']}" for v in vs)  # noqa: E731
    return "\n".join([
        f"artifact   {printable(s['artifact'])}  (ONNX model, opset {s.get('opset')}, {human_bytes(s['bytes'])})",
        f"graph      in: {io(s['inputs'])} ({pre.get('input')}); out: {io(s['outputs'])}; integrity {s['integrity']}",
        f"backbone   {prov.get('model')}  weights={prov.get('weights')}  seed={prov.get('seed')}  embed_dim={prov.get('embed_dim')}"
        + (f"  layer={prov['layer']} ({prov.get('layer_pool')})" if prov.get("layer") else ""),
        _preprocessing_line(pre) + f"  input={pre.get('input')}",
        f"head       {prov.get('head_kind')} ({prov.get('artifact_kind')} {printable(str(prov.get('artifact')))}, sha256 {prov.get('artifact_sha256')}); "
        f"val accuracy {acc}",
        f"classes    {len(classes)}: {', '.join(printable(c) for c in classes[:10])}{' …' if len(classes) > 10 else ''}",
        f"data root  {printable(str(prov.get('data_root')))}  (cache fingerprint {prov.get('cache_fingerprint')})",
        f"exported   {exported.get('at')} by featcache {s.get('featcache_version')}, torch {exported.get('torch_version')}; "
        f"checked against predict on {check.get('probe_images')} image(s): max |dp| {float(check.get('max_abs_diff') or 0):.2g}",
    ])


def format_job_plan(result: Any) -> str:
    lines = [f"job {result.name} ({result.job})"]
    for step in result.steps:
        lines.append(f"  {step.kind:<9} {step.action:<10} {step.target}  ({step.reason})")
    lines.append("  nothing to do: everything is up to date" if not result.did_work else "  run it with: " + command_hint(f"run {result.job}"))
    return "\n".join(lines)
