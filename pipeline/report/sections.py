"""The report's sections, each a function from what was computed to HTML."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .. import __version__
from ..heads import CELL_LABEL_MAX_CLASSES, LoadedHead, top_confusions
from .figures import confusion_uri, history_uri, map_uri
from .html import cards, chart, esc, key_values, section, table, thumb

FIELDS = (("accuracy", "accuracy"), ("top5_accuracy", "top-5"), ("macro_f1", "macro F1"), ("log_loss", "log loss"))


def _class(view: dict[str, Any], row: int) -> str:
    label = int(view["data"].labels[row])
    return view["data"].classes[label] if label >= 0 else "(unlabeled)"


def _thumb(view: dict[str, Any], row: int, caption: list[str], css: str = "") -> str:
    path = str(view["data"].paths[row])
    return thumb(view["thumbs"].uri(path), caption, view["options"].thumb_size, title=path, css=css)


def _more(shown: int, total: int, what: str) -> str:
    return f"{total - shown:,} more {what} are not shown (--max-images {shown}); `featcache audit CACHE --json` lists them all" if total > shown else ""


def split_name(split: str) -> str:
    """What a metric was measured on, for a label: ``val``, ``test``, or every labelled row of another dataset."""
    return "all labelled rows" if split == "all" else split


def _measured_on(label: str, split: str) -> str:
    return f"{label} ({split_name(split)})" if split == "all" else f"{split} {label}"


def summary(main: dict[str, Any] | None, audit: Any, todo: list[str], notes: list[str], split: str = "val", findings: list[str] = ()) -> str:
    """Tiles (each naming the rows it was measured on), the advice, then facts that are not advice."""
    items = [(_measured_on(label, split), main[key]) for key, label in FIELDS if main and main.get(key) is not None]
    if audit is not None:
        counts = audit.counts()
        items += [("likely label errors (all splits)", counts["label-errors"]), ("near-duplicate pairs (all splits)", counts["duplicates"]),
                  ("split leaks", counts["leaks"])]
    body = cards(items)
    if todo:
        body += "<h3>What to do</h3><ol class=todo>" + "".join(f"<li>{esc(t)}</li>" for t in todo) + "</ol>"
    body += "".join(f"<p>{esc(f)}</p>" for f in findings)
    body += "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return section("summary", "Summary", body)


def confusions_line(matrix: list[list[int]] | None, classes: list[str], split: str, shown: int = 3) -> str:
    """``most frequent confusions (val): a → b (3), c → d (1)``; empty when nothing was confused."""
    pairs = top_confusions(matrix, classes, shown) if matrix else []
    if not pairs:
        return ""
    return f"most frequent confusions ({split_name(split)}, true → predicted): " + ", ".join(f"{t} → {p} ({n})" for t, p, n in pairs)


def split_rule(rule: dict[str, Any], prov: dict[str, Any]) -> str | None:
    """How the rows were split, saying only what applies: the data's own folders (or split
    column), or the random split drawn (its val_fraction and seed)."""
    if not rule:
        return None
    if rule.get("kind") == "folders":
        present = [s for s in ("train", "val", "test") if prov.get(f"n_{s}")] or ["train"]
        if prov.get("layout") == "manifest":
            return "from the manifest's split column: " + ", ".join(present)
        return "from the folders " + " ".join(f"{s}/" for s in present)
    return f"random (hash of each path): val_fraction {rule.get('val_fraction')}, seed {rule.get('seed')}"


def _preprocessing(pre: dict[str, Any] | None) -> str:
    if not pre:
        return "(not recorded)"
    keys = ("resize_size", "crop_size", "interpolation", "mean", "std")
    return ", ".join(f"{k}={pre[k]}" for k in keys if k in pre) or json.dumps(pre)


def provenance(loaded: LoadedHead, view: dict[str, Any]) -> str:
    prov = loaded.provenance
    rule = prov.get("split_rule") or {}
    params = {k: v for k, v in loaded.head.get_params().items() if v is not None}
    meta = view["data"].meta if view.get("data") is not None else {}
    stale = view.get("stale")
    backbone = [("model", str(prov.get("model")) + (f" (layer {prov['layer']}, {prov.get('layer_pool')})" if prov.get("layer") else "")),
                ("weights", prov.get("weights")), ("weights given as", prov.get("weights_spec")), ("seed (random init)", prov.get("seed")),
                ("preprocessing", _preprocessing(prov.get("preprocessing"))), ("embedding", f"{prov.get('embed_dim')}-d {prov.get('dtype') or ''}".strip()),
                ("engine / precision / decode", " / ".join(str(prov.get(k) or meta.get(k) or "–") for k in ("engine", "precision", "decode")))]
    data = [("data", prov.get("data_root")), ("layout", prov.get("layout")), ("classes", f"{len(prov.get('classes', []))}: " + ", ".join(prov.get("classes", [])[:12])
                                                                                                        + (" …" if len(prov.get("classes", [])) > 12 else "")),
            ("cache scored", str(view["cache"]) if view.get("cache") else None),
            ("cache since the fit", None if stale is None else ("CHANGED since the head was fitted (refit it)" if stale else "unchanged")),
            ("split rule", split_rule(rule, prov)),
            ("rows", f"train {prov.get('n_train')}, val {prov.get('n_val')}, test {prov.get('n_test')}")]
    head = [("artifact", str(loaded.path)), ("kind", loaded.kind + (" (fine-tuned model)" if "base_head" in prov else "")),
            ("hyper-parameters", json.dumps(params, default=str)), ("chosen C", loaded.extra.get("C")), ("base head", prov.get("base_head")),
            ("fine-tune options", json.dumps(prov["finetune"], default=str) if prov.get("finetune") else None), ("fitted at", prov.get("fitted_at"))]
    versions = [(f"{k.removesuffix('_version')}", prov.get(k) or meta.get(k)) for k in ("featcache_version", "torch_version", "torchvision_version",
                                                                                       "sklearn_version", "numpy_version")]
    versions.append(("report made by", f"featcache {__version__}"))
    body = ("<div class=grid><div><h3>Backbone</h3>" + key_values(backbone) + "</div><div><h3>Data</h3>" + key_values(data) + "</div>"
            "<div><h3>Head</h3>" + key_values(head) + "</div><div><h3>Versions</h3>" + key_values(versions) + "</div></div>")
    return section("provenance", "Provenance", body)


def metrics(loaded: LoadedHead, scores: dict[str, dict[str, Any]], view: dict[str, Any]) -> str:
    if not scores:
        return section("metrics", "Metrics", "<p>No validation or test rows to score.</p>")
    where = "scored on the cache now" if view.get("scored") is not None else "as recorded in the artifact when it was trained"
    rows = [[s, m["n"], *[m.get(k) for k, _ in FIELDS]] for s, m in scores.items()]
    body = table(["split", "rows", *[label for _, label in FIELDS]], rows, numeric=range(1, 6))
    main = next(s for s in ("val", "all", "test") if s in scores)
    per = scores[main]["per_class"]
    body += f"<h3>Per class ({esc(main)})</h3>" + table(["class", "precision", "recall", "F1", "support"],
                                                       [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in per.items()], numeric=range(1, 5))
    classes = list(per)
    body += "<div class=grid>" + "".join(f"<div><h3>Confusion matrix ({esc(s)})</h3>{chart(confusion_uri(m['confusion_matrix'], classes, f'{s} confusion'), f'{s} confusion matrix', _chart_width(classes))}</div>"
                                         for s, m in scores.items()) + "</div>"
    for s, m in scores.items():
        pairs = top_confusions(m["confusion_matrix"], classes)
        if pairs:
            support = {c: v["support"] for c, v in m["per_class"].items()}
            body += (f"<h3>Most frequent confusions ({esc(split_name(s))}): top {len(pairs)} of the off-diagonal cells</h3>"
                     + table(["true", "predicted as", "images", "share of the true class"],
                             [[t, p, n, f"{n / support[t]:.1%}" if support.get(t) else "–"] for t, p, n in pairs], numeric=(2, 3)))
    history = loaded.extra.get("history") or []
    if history:
        body += "<h3>Training curves</h3>" + chart(history_uri(history, f"{loaded.kind}: training history"), "training curves")
    path = loaded.extra.get("cv_path") or []
    if path:
        body += ("<details><summary>C selection path (cross-validated accuracy per C)</summary>"
                 + table(["C", "accuracy", "iterations", "seconds"], [[f"{p['C']:.3g}", p["score"], p["n_iter"], p["seconds"]] for p in path], numeric=(1, 2, 3))
                 + "</details>")
    return section("metrics", "Metrics", body, note=f"Metrics {where}.")


def _chart_width(classes: list[str]) -> int:
    """CSS pixels for a confusion matrix: a many-class one (matrix and top-confusions panel) gets the page's width."""
    return 480 if len(classes) <= CELL_LABEL_MAX_CLASSES else 1100


def mistakes(view: dict[str, Any], group: str, rows: np.ndarray, proba: np.ndarray, pred: np.ndarray, neighbours) -> str:
    opts = view["options"]
    if view.get("scored") is None:
        return section("mistakes", "Misclassified images", f"<p>{esc(view['notes'][0] if view['notes'] else 'not scored on a cache')}</p>")
    if not group:
        return section("mistakes", "Misclassified images", "<p>No validation or test rows in this cache.</p>")
    if not len(rows):
        return section("mistakes", f"Misclassified {group} images", "<p class=good>None: every image is classified correctly.</p>")
    classes = view["data"].classes
    items = []
    shown = min(len(rows), opts.max_images)
    for n in range(shown):
        r = int(rows[n])
        true = int(view["data"].labels[r])
        main = _thumb(view, r, [f"true {classes[true]}", f"pred {classes[int(pred[n])]} {proba[n, int(pred[n])]:.2f}", f"p(true) {proba[n, true]:.2f}"])
        near = ""
        if neighbours is not None:
            idx, sims = neighbours
            near = "".join(_thumb(view, int(j), [_class(view, int(j)), f"sim {s:.3f}"]) for j, s in zip(idx[n], sims[n]))
            near = f'<div class="row">{near}</div>'
        items.append(f'<div class="item"><div class="row">{main}{near}</div></div>')
    note = ("Worst first: lowest probability of the true class. Beside each, its nearest training images (cosine similarity in the whitened "
            "embedding space of the audit). ") + _more(shown, len(rows), "mistakes")
    return section("mistakes", f"Misclassified {group} images: {len(rows):,}", f'<div class="grid">{"".join(items)}</div>', note=note)


def label_errors(view: dict[str, Any]) -> str:
    audit = view["audit"]
    if audit.issues is None:
        return section("label-errors", "Likely label errors", f"<p>{esc(audit.label_errors_skipped)}</p>")
    rows = audit.label_error_rows()
    opts = view["options"]
    method = (f"Confident learning on {audit.oof.folds}-fold out-of-fold probabilities of the logistic regression (C={audit.oof.C:g}, out-of-fold accuracy "
              f"{audit.oof.accuracy:.4f}) over all {len(audit.labelled):,} labelled rows, in {audit.space.dims} whitened principal components; "
              f"the same rows as cleanlab's find_label_issues(filter_by={opts.label_method!r}). Lowest probability of the given label first. ")
    est = audit.estimate
    if est is not None:
        method += (f"Measured on this data with {est.planted} planted label flips (one more out-of-fold fit): estimated precision {est.precision:.2f}, "
                   f"recall {est.recall:.2f}" + (f" at p(given) <= {est.threshold:.3g}" if est.threshold < 1.0 else "") + ". ")
    if not audit.label_errors_reliable:
        from ..quality import POOR_PRECISION

        rows = audit.hardest_rows()
        method = (f"Not label errors: the detector is not reliable on this data (estimated precision {est.precision_at_cleanlab:.2f} on planted flips, "
                  f"under {POOR_PRECISION:g}), so these are the hardest examples, more likely the model's mistakes than wrong labels; keep the labels unless you "
                  "see an error. ") + method
    title = "Likely label errors" if audit.label_errors_reliable else "Hardest examples (label errors not reliable here)"
    if not len(rows):
        return section("label-errors", title, "<p class=good>None found.</p>", note=method)
    shown = min(len(rows), opts.max_images)
    cells = []
    for r in rows[:shown]:
        e = audit.label_error(int(r))
        cells.append(_thumb(view, int(r), [f"given {e['given']}", f"suggested {e['suggested']}", f"p(given) {e['given_probability']:.2f}", e["split"] or "–"]))
    per = np.zeros((len(audit.classes), len(audit.classes)), dtype=np.int64)
    np.add.at(per, (audit.labels[rows], audit.issues.suggested[np.searchsorted(audit.labelled, rows)]), 1)
    pairs = [(audit.classes[g], audit.classes[s], int(per[g, s])) for g, s in zip(*np.nonzero(per))]
    pairs.sort(key=lambda p: -p[2])
    body = f'<div class="grid">{"".join(cells)}</div><h3>By given and suggested class</h3>' + table(["given", "suggested", "rows"], pairs[:30], numeric=(2,))
    return section("label-errors", f"{title}: {len(rows):,}", body, note=method + _more(shown, len(rows), "suspects"))


def duplicates(view: dict[str, Any]) -> str:
    audit = view["audit"]
    opts = view["options"]
    d = audit.duplicates
    search = ("Exact copies only (no space to search for near-duplicates: see the notes)" if audit.space is None else
              f"Pairs of rows at cosine similarity >= {audit.duplicate_threshold:.4g} in the whitened principal-component space (exact search over "
              "every pair, in blocks), and every exact copy")
    method = (f"{search}; exact = the same file bytes (SHA-256) or byte-identical embeddings, listed whatever the threshold, each copy against its "
              "group's first training row; leak = the two rows are in different splits. Leaks first.")
    if d is None or not len(d):
        return section("duplicates", "Near-duplicates and split leaks", "<p class=good>None found.</p>", note=method)
    order = np.lexsort((-d.pairs.similarity, ~d.leak))
    shown = min(len(order), max(1, opts.max_images // 2))
    items = []
    for p in order[:shown]:
        e = audit.duplicate(int(p))
        tags = ('<span class="tag leak">leak</span>' if e["leak"] else "") + ('<span class="tag exact">exact</span>' if e["exact"] else "")
        pair = "".join(_thumb(view, int(r), [_class(view, int(r)), str(audit.split[int(r)]) or "–"]) for r in (d.pairs.i[p], d.pairs.j[p]))
        items.append(f'<div class="item"><div class="row">{pair}</div><div class="note">sim {e["similarity"]:.4f}{tags}</div></div>')
    counts = d.counts(audit.split)
    summary = key_values([("pairs", counts["pairs"]), ("leaks (across splits)", counts["leaks"]), ("val images copying a train image", counts["val_copies_of_train"]),
                          ("test images copying a train image", counts["test_copies_of_train"]),
                          ("exact pairs (same file or embedding)", counts["exact_pairs"])])
    return section("duplicates", f"Near-duplicates and split leaks: {counts['pairs']:,} pairs, {counts['leaks']:,} leaks",
                   summary + f'<div class="grid">{"".join(items)}</div>', note=method + " " + _more(shown, len(order), "pairs"))


def embedding_map(view: dict[str, Any], mistake_rows: np.ndarray) -> str:
    emap = view.get("map")
    audit = view["audit"]
    if emap is None:
        return section("map", "Map of the embeddings", "<p>Too few rows for a map.</p>")
    where = {int(r): n for n, r in enumerate(emap.rows)}
    marks = lambda rows: np.array([where[int(r)] for r in rows if int(r) in where], dtype=np.int64)
    labels = view["data"].labels[emap.rows]
    uri = map_uri(emap.xy, labels, view["data"].classes, marks(mistake_rows), marks(audit.label_error_rows()), emap.note)
    return section("map", "Map of the embeddings", chart(uri, "2-D map of the embeddings"),
                   note="Coloured by given class; black crosses: misclassified images; red rings: likely label errors.")


def data(view: dict[str, Any]) -> str:
    audit = view["audit"]
    counts = audit.class_counts()
    imb = audit.imbalance()
    splits = {s: np.bincount(view["data"].labels[(audit.split == s) & (view["data"].labels >= 0)], minlength=len(audit.classes)) for s in ("train", "val", "test")}
    rows = [[c, n, *[int(splits[s][k]) for s in ("train", "val", "test")]] for k, (c, n) in enumerate(counts.items())]
    body = table(["class", "rows", "train", "val", "test"], rows, numeric=range(1, 5))
    if imb["ratio"] is not None:
        ratio = "∞" if imb["ratio"] == float("inf") else f"{imb['ratio']:.1f}"
        body += f"<p>Largest / smallest class: {esc(ratio)} ({esc(imb['largest'])} / {esc(imb['smallest'])}).</p>"
    unlabeled = int((view["data"].labels < 0).sum())
    if unlabeled:
        body += f"<p>{unlabeled:,} unlabeled rows (in the map and the duplicate search, not in label errors).</p>"
    if audit.failures:
        body += f"<h3>Files that failed: {len(audit.failures):,}</h3>" + table(["file", "reason"], audit.failures[:200])
    else:
        body += "<p class=good>No file failed to decode.</p>"
    missing = view["thumbs"].missing
    if missing:
        body += (f"<details><summary>{len(missing):,} image(s) shown as grey boxes: no thumbnail</summary>"
                 + table(["file", "why"], sorted(missing.items())[:200]) + "</details>")
    if audit.notes:
        body += "".join(f'<p class="note">{esc(n)}</p>' for n in audit.notes)
    return section("data", "Data", body)
