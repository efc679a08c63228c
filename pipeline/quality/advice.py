"""A short "what to do" list computed from the audit (and a head's metrics): the few
findings that most change a model's score or its honesty, biggest first."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

MAX_ITEMS = 8


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def advice(audit: Any, metrics: dict[str, Any] | None = None) -> list[str]:
    """Plain sentences, most important first (leaks, label errors, duplicates, imbalance,
    failed files, then the head's weakest class and most confused pair)."""
    items: list[str] = []
    dup = audit.duplicates.counts(audit.split) if audit.duplicates is not None else None
    if dup:
        for s in ("val", "test"):
            if dup[f"{s}_copies_of_train"]:
                items.append(f"{_plural(dup[f'{s}_copies_of_train'], s + ' image')} duplicate{'s' if dup[f'{s}_copies_of_train'] == 1 else ''} "
                             f"a training image: remove {'it' if dup[f'{s}_copies_of_train'] == 1 else 'them'} from {s}/ (or the copy from train/) "
                             f"so {s} accuracy measures images the model has not seen")
        a, b = audit.split[audit.duplicates.pairs.i], audit.split[audit.duplicates.pairs.j]
        other = int((audit.duplicates.leak & (a != "train") & (b != "train")).sum())
        if other:
            items.append(f"{_plural(other, 'near-duplicate pair')} join{'s' if other == 1 else ''} val and test: keep each image in one split")
    if audit.issues is not None and not audit.label_errors_reliable and len(audit.hardest_rows()):
        est = audit.estimate
        items.append(f"look at the {_plural(len(audit.hardest_rows()), 'hardest example')} (lowest probability of the given label); the label-error "
                     f"detector is not reliable on this data (estimated precision {est.precision_at_cleanlab:.2f} on {est.planted} planted flips, "
                     f"out-of-fold accuracy {audit.oof.accuracy:.2f}), so they are more likely the model's mistakes than wrong labels: "
                     "keep the labels unless you see an error")
    if audit.issues is not None and len(audit.label_error_rows()):
        rows = audit.label_error_rows()
        est = audit.estimate
        measured = f" (estimated precision {est.precision:.2f}, recall {est.recall:.2f} on planted flips)" if est is not None else ""
        by_class = Counter(audit.classes[int(audit.labels[r])] for r in rows)
        suggested = Counter((audit.classes[int(audit.labels[r])], audit.classes[int(audit.issues.suggested[np.searchsorted(audit.labelled, r)])]) for r in rows)
        for name, n in by_class.most_common(3):
            (_, likely), _ = max(((k, v) for k, v in suggested.items() if k[0] == name), key=lambda kv: kv[1])
            items.append(f"{_plural(n, 'suspected label error')} in class {name} (most look like {likely}): check them and fix the labels that are wrong{measured}")
            measured = ""
        if len(by_class) > 3:
            rest = sum(n for _, n in by_class.most_common()[3:])
            items.append(f"{_plural(rest, 'more suspected label error')} in {len(by_class) - 3} other class{'es' if len(by_class) > 4 else ''}")
    if audit.oof is not None and audit.issues is None:
        items.append(f"the embeddings barely separate the classes (out-of-fold accuracy {audit.oof.accuracy:.2f}, largest class alone "
                     f"{audit.oof.chance:.2f}): label errors were not assessed; try a pretrained or stronger backbone")
    if dup and dup["pairs"] - dup["leaks"] > 0:
        within = dup["pairs"] - dup["leaks"]
        exact = int((audit.duplicates.exact & ~audit.duplicates.leak).sum())
        items.append(f"{_plural(within, 'near-duplicate pair')} within a split ({exact} exact copies: same file or same embedding): drop the copies, "
                     "they weigh those images twice")
    imb = audit.imbalance()
    if imb["minority_classes"]:
        counts = audit.class_counts()
        names = ", ".join(f"{c} ({counts[c]})" for c in imb["minority_classes"][:4]) + (" …" if len(imb["minority_classes"]) > 4 else "")
        items.append(f"{_plural(len(imb['minority_classes']), 'class')} under 1/{audit.options.imbalance_ratio:g} of the largest ({imb['largest']}, "
                     f"{counts[imb['largest']]}): {names}; collect more, or fit with --class-weight balanced")
    if audit.failures:
        items.append(f"{_plural(len(audit.failures), 'file')} could not be read or decoded and {'is' if len(audit.failures) == 1 else 'are'} "
                     "not in the cache: see `featcache status CACHE` for the reasons")
    if metrics:
        per = metrics.get("per_class", {})
        if per:
            worst = min(per, key=lambda c: (per[c]["recall"], c))
            if per[worst]["support"] and per[worst]["recall"] < 0.9:
                items.append(f"class {worst} has the lowest recall ({per[worst]['recall']:.2f} on {per[worst]['support']} images): "
                             "look at its mistakes below first")
        cm = np.asarray(metrics.get("confusion_matrix", []))
        if cm.size:
            off = cm.copy()
            np.fill_diagonal(off, 0)
            if off.max() > 0:
                t, p = np.unravel_index(off.argmax(), off.shape)
                names = list(per)
                if names:
                    items.append(f"the most frequent confusion: {names[t]} predicted as {names[p]} ({off[t, p]} time{'s' if off[t, p] != 1 else ''})")
    if not items:
        if audit.issues is None:
            items.append("nothing stands out among the checks that ran: no near-duplicates, leaks, imbalance or failed files (label errors not assessed)")
        else:
            items.append("nothing stands out: no likely label errors, near-duplicates, leaks, imbalance or failed files")
    return items[:MAX_ITEMS]
