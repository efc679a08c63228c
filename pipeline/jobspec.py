"""The job file: one TOML document that declares a whole nightly run, validated up front.

```toml
name = "flowers-nightly"          # optional (default: the file's name)
data = ["/data/flowers"]          # one or more image folders
cache_dir = "cache"               # default "cache"
out_dir = "runs/flowers"          # heads, fine-tuned models, reports (default "runs/<name>")
device = "auto"

[[backbones]]
model = "resnet50"
weights = "DEFAULT"               # + extract options: batch_size, workers, dtype, layout, seed, ...

[[heads]]
clf = "logreg"                    # + fit-head options: C, epochs, lr, hidden, val_fraction, ...

[finetune]                        # optional: fine-tune each backbone from one of its heads
from_head = "logreg"
epochs = 3                        # + finetune options: unfreeze, augment, lr_backbone, ...
```

Relative paths are relative to the job file. Every problem in the file is reported at
once (unknown keys with suggestions, wrong types, missing folders, unknown models or
heads) before any work starts.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .finetune import DEFAULTS as FINETUNE_DEFAULTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NUMBER = (int, float)
TOP_KEYS: dict[str, Any] = {"name": str, "data": (str, list), "cache_dir": str, "out_dir": str, "device": str, "workers": int,
                            "backbones": list, "heads": list, "finetune": dict}
BACKBONE_KEYS: dict[str, Any] = {"model": str, "weights": str, "batch_size": int, "workers": int, "dtype": str, "layout": str, "seed": int,
                                 "commit_every": int, "commit_seconds": NUMBER, "max_pixels": int, "amp": bool,
                                 "engine": str, "precision": str, "decode": str}
HEAD_KEYS: dict[str, Any] = {"name": str, "clf": str, "C": NUMBER, "jobs": int, "epochs": int, "lr": NUMBER, "weight_decay": NUMBER,
                             "batch_size": int, "hidden": list, "dropout": list, "label_smoothing": NUMBER, "schedule": str, "patience": int,
                             "class_weight": str, "val_fraction": NUMBER, "seed": int, "stream": bool}


def _option_type(default: Any) -> Any:
    """The TOML type a fine-tune option takes, from its default (None: a number chosen per optimizer)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    return NUMBER if default is None or isinstance(default, float) else type(default)


# The [finetune] table: where to start from and how to decode, plus every `finetune` option
# (derived from finetune.DEFAULTS, so a new option is accepted here without a second list).
FINETUNE_KEYS: dict[str, Any] = {"from_head": str, "workers": int, **{k: _option_type(v) for k, v in FINETUNE_DEFAULTS.items()}}


class JobFileError(UsageError):
    """The job file has problems; the message lists all of them."""


@dataclass
class BackboneSpec:
    model: str
    weights: str = "DEFAULT"
    extract: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadSpec:
    name: str
    clf: str
    params: dict[str, Any] = field(default_factory=dict)  # fit-head options as given

    def digest(self) -> str:
        """What a fitted head must have been fitted with to count as up to date."""
        return hashlib.sha256(json.dumps({"clf": self.clf, **self.params}, sort_keys=True).encode()).hexdigest()[:16]

    def fit_args(self) -> dict[str, Any]:
        """``fit_head`` keyword arguments (raises UsageError for bad values)."""
        from .fit import head_params

        p = self.params
        params = head_params(self.clf, C=p.get("C"), jobs=p.get("jobs"), seed=p.get("seed", 0), class_weight=p.get("class_weight"),
                             epochs=p.get("epochs"), lr=p.get("lr"), weight_decay=p.get("weight_decay"), batch_size=p.get("batch_size"),
                             hidden=tuple(p["hidden"]) if "hidden" in p else None, dropout=tuple(p["dropout"]) if "dropout" in p else None,
                             label_smoothing=p.get("label_smoothing", 0.0), schedule=p.get("schedule", "cosine"), patience=p.get("patience"))
        if not 0.0 <= p.get("val_fraction", 0.2) < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {p['val_fraction']}")
        return {"params": params, "val_fraction": p.get("val_fraction", 0.2), "seed": p.get("seed", 0), "stream": p.get("stream", False)}


@dataclass
class FinetuneSpec:
    from_head: str
    options: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None


@dataclass
class JobSpec:
    path: Path
    name: str
    data: list[Path]
    cache_dir: Path
    out_dir: Path
    device: str = "auto"
    workers: int | None = None
    backbones: list[BackboneSpec] = field(default_factory=list)
    heads: list[HeadSpec] = field(default_factory=list)
    finetune: FinetuneSpec | None = None


def _type_name(t: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table", NUMBER: "a number", (str, list): "a string or a list of strings"}
    return names.get(t, str(t))


def _type_ok(value: Any, expected: Any) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False  # TOML true is not a number
    return isinstance(value, expected)


def _check_table(table: dict[str, Any], schema: dict[str, Any], where: str, problems: list[str]) -> None:
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            problems.append(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(schema)}"))
        elif not _type_ok(value, schema[key]):
            problems.append(f"{where}.{key}: expected {_type_name(schema[key])}, got {type(value).__name__} {value!r}")


def _tables(doc: dict[str, Any], key: str, schema: dict[str, Any], problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The entries of an array of tables (``[[key]]``) with their location, keys checked;
    entries that are not tables are reported and left out."""
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        return []  # a wrong type for the key itself is reported by the top-level check
    found = []
    for i, table in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table ([[{key}]])")
            continue
        _check_table(table, schema, where, problems)
        found.append((where, table))
    return found


def _type_problems(problems: list[str], where: str) -> bool:
    return any(p.startswith(where + ".") and ": expected " in p for p in problems)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``finetune.epochs=3`` / ``backbones.0.batch_size=16`` / ``device=cpu`` -> (key path, value).

    The value is read as TOML (numbers, true/false, "strings", [lists]); bare words are strings.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise JobFileError(f"--set {text!r}: write KEY=VALUE, e.g. --set finetune.epochs=3 or --set device=cpu")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = doc
        for i, key in enumerate(keys[:-1]):
            nxt = keys[i + 1]
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise JobFileError(f"--set {text!r}: {'.'.join(keys[:i + 1])} is not an entry of the list (it has {len(node)})")
                node = node[int(key)]
            else:
                node = node.setdefault(key, [] if nxt.isdigit() else {})
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise JobFileError(f"--set {text!r}: no list entry {last!r}")
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override (``--set``) and validate a job file; every problem is reported at once.

    Raises:
        JobFileError: missing/unreadable/invalid TOML, or a list of problems.
    """
    from .backbones import check_model_name
    from .errors import BackboneError
    from .finetune import resolve_options
    from .heads import HEAD_KINDS

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise JobFileError(f"job file {str(path)!r} is a folder; pass a .toml job file (see README: Batch jobs)")
        raise JobFileError(f"job file {str(path)!r} does not exist; pass a .toml job file (see README: Batch jobs)")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobFileError(f"job file {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise JobFileError(f"job file {str(path)!r} cannot be read: {exc.strerror}") from None
    doc = apply_overrides(doc, overrides or [])
    base = path.resolve().parent
    problems: list[str] = []
    _check_table(doc, TOP_KEYS, "job", problems)

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    data_field = doc.get("data")
    data: list[Path] = []
    if data_field is None:
        problems.append("job.data: missing; give the image folder(s), e.g. data = [\"/data/flowers\"]")
    else:
        items = [data_field] if isinstance(data_field, str) else data_field if isinstance(data_field, list) else []
        if isinstance(data_field, list) and not data_field:
            problems.append("job.data: the list is empty; give at least one image folder")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                problems.append(f"job.data[{i}]: expected a folder path string, got {item!r}")
                continue
            folder = resolve(item)
            if not folder.exists():
                problems.append(f"job.data[{i}]: folder {str(folder)!r} does not exist")
            elif not folder.is_dir():
                problems.append(f"job.data[{i}]: {str(folder)!r} is a file, not a folder")
            data.append(folder)
    device = doc.get("device", "auto")
    if isinstance(device, str) and not (device in ("auto", "cpu") or device.startswith("cuda")):
        problems.append(f"job.device: {device!r} is not auto, cpu or cuda[:N]")

    backbones: list[BackboneSpec] = []
    if isinstance(doc.get("backbones", []), list) and not doc.get("backbones"):
        problems.append("job.backbones: none given; add a [[backbones]] table with model = \"resnet50\"")
    for where, b in _tables(doc, "backbones", BACKBONE_KEYS, problems):
        model = b.get("model")
        if not isinstance(model, str):
            problems.append(f"{where}.model: missing; e.g. model = \"resnet50\"")
            continue
        try:
            check_model_name(model)
        except BackboneError as exc:
            problems.append(f"{where}.model: {exc}")
        extract = {k: v for k, v in b.items() if k not in ("model", "weights")}
        backbones.append(BackboneSpec(model, str(b.get("weights", "DEFAULT")), extract))

    heads: list[HeadSpec] = []
    for where, h in _tables(doc, "heads", HEAD_KEYS, problems):
        clf = h.get("clf")
        if clf not in HEAD_KINDS:
            problems.append(f"{where}.clf: {clf!r} is not a head; choose one of {', '.join(HEAD_KINDS)}")
            continue
        name = str(h.get("name", clf))
        if any(x.name == name for x in heads):
            problems.append(f"{where}.name: {name!r} is used twice; give each head a distinct name")
        spec = HeadSpec(name, clf, {k: v for k, v in h.items() if k not in ("name", "clf")})
        if not _type_problems(problems, where):  # types are right: check the values
            try:
                spec.fit_args()
            except UsageError as exc:
                problems.append(f"{where}: {exc}")
        heads.append(spec)

    finetune = None
    raw_ft = doc.get("finetune")
    if isinstance(raw_ft, dict):
        _check_table(raw_ft, FINETUNE_KEYS, "finetune", problems)
        from_head = raw_ft.get("from_head", heads[0].name if heads else None)
        if from_head is None:
            problems.append("finetune: needs a head to start from; add a [[heads]] table")
        elif not any(h.name == from_head for h in heads):
            problems.append(f"finetune.from_head: no head named {from_head!r} (heads: {', '.join(h.name for h in heads) or 'none'})")
        options = {k: v for k, v in raw_ft.items() if k not in ("from_head", "workers")}
        if not _type_problems(problems, "finetune"):
            try:
                resolve_options(options)
            except UsageError as exc:
                problems.append(f"finetune: {exc}")
        finetune = FinetuneSpec(str(from_head), options, raw_ft.get("workers"))

    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise JobFileError(f"job file {str(path)!r} has {len(problems)} problem(s); nothing was run:\n{lines}")
    name = str(doc.get("name", path.stem))
    return JobSpec(path=path.resolve(), name=name, data=data, cache_dir=resolve(doc.get("cache_dir", "cache")),
                   out_dir=resolve(doc.get("out_dir", f"runs/{name}")), device=device, workers=doc.get("workers"),
                   backbones=backbones, heads=heads, finetune=finetune)
