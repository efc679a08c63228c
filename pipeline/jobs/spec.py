"""The job file: one TOML document that declares a whole nightly run, validated up front.

```toml
name = "flowers-nightly"          # optional (default: the file's name)
data = ["/data/flowers"]          # one or more image folders
cache_dir = "cache"               # default "cache"
out_dir = "runs/flowers"          # heads, fine-tuned models, reports (default "runs/<name>")
device = "auto"
report = true                     # HTML report beside each head fitted, audit counts in run.json (default true)

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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import canonical_device
from ..errors import DataError, UsageError
from ..extract import ExtractOptions
from ..finetune import FinetuneOptions
from ..heads import FitOptions
from ..images import MANIFEST_SUFFIXES, expand_shards, is_dataset_spec, is_hf_spec, is_manifest, is_shards
from ..options import build, check_device_name, toml_schema, type_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Each table takes its stage's options (the same fields as the command's flags, checked by
# the same code) plus the keys that say what the table is about.
TOP_KEYS: dict[str, Any] = {"name": str, "data": None, "cache_dir": str, "out_dir": str, "device": str, "workers": int, "report": bool,
                            "backbones": list, "heads": list, "finetune": dict}  # None: checked on its own below
BACKBONE_KEYS: dict[str, Any] = {"model": str, **toml_schema(ExtractOptions)}
HEAD_KEYS: dict[str, Any] = {"name": str, **toml_schema(FitOptions)}
FINETUNE_KEYS: dict[str, Any] = {"from_head": str, **toml_schema(FinetuneOptions)}


class JobFileError(UsageError):
    """The job file has problems; the message lists all of them."""


@dataclass
class BackboneSpec:
    model: str
    options: ExtractOptions = field(default_factory=ExtractOptions)

    @property
    def weights(self) -> str:
        return self.options.weights


@dataclass
class HeadSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)  # the table's options as written (for the digest)
    options: FitOptions = field(default_factory=FitOptions)

    @property
    def clf(self) -> str:
        return self.options.clf

    def digest(self) -> str:
        """What a fitted head must have been fitted with to count as up to date."""
        return hashlib.sha256(json.dumps({"clf": self.clf, **self.params}, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FinetuneSpec:
    from_head: str
    options: FinetuneOptions = field(default_factory=FinetuneOptions)


@dataclass
class JobSpec:
    path: Path
    name: str
    data: list[Path]
    cache_dir: Path
    out_dir: Path
    device: str = "auto"
    workers: int | None = None
    report: bool = True  # an HTML report beside every head fitted, and the cache's audit counts in run.json
    backbones: list[BackboneSpec] = field(default_factory=list)
    heads: list[HeadSpec] = field(default_factory=list)
    finetune: FinetuneSpec | None = None


def _type_ok_problem(value: Any, expected: Any) -> str | None:
    if expected is None:
        return None
    if expected in (list, dict):
        return None if isinstance(value, expected) else f"expected {'a list' if expected is list else 'a table'}, got {type(value).__name__} {value!r}"
    return type_problem(value, expected)


def _check_table(table: dict[str, Any], schema: dict[str, Any], where: str, problems: list[str]) -> None:
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            problems.append(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(schema)}"))
        else:
            problem = _type_ok_problem(value, schema[key])
            if problem:
                problems.append(f"{where}.{key}: {problem}")


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


def _options(cls: type, values: dict[str, Any], where: str, problems: list[str]) -> Any:
    """The table's options object, or None with the problem recorded (once: a table with a
    key of the wrong type, already reported, is not checked again)."""
    if any(p.startswith(where + ".") and ": expected " in p for p in problems):
        return None
    try:
        return build(cls, {k: v for k, v in values.items() if k in toml_schema(cls)})
    except UsageError as exc:
        problems.append(f"{where}: {exc}")
        return None


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


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def name_problem(name: str) -> str | None:
    """Job and head names become file and folder names: one path component of letters,
    digits and ``._+-`` (no separators, no leading dot, nothing hidden or traversing)."""
    if _SAFE_NAME.match(name) and name not in (".", ".."):
        return None
    return f"{name!r} cannot be a file name; use letters, digits and . _ + - (starting with a letter or digit, at most 100)"


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override (``--set``) and validate a job file; every problem is reported at once.

    Raises:
        JobFileError: missing/unreadable/invalid TOML, or a list of problems.
    """
    from ..backbones import check_model_name
    from ..errors import BackboneError

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
            named = is_dataset_spec(item) or is_hf_spec(item)  # torchvision:NAME:ROOT, hf:PATH
            folder = Path(item) if named else resolve(item)
            if named:
                pass  # checked when it is read (torchvision:NAME:ROOT)
            elif is_shards(folder):
                try:
                    expand_shards(folder)
                except DataError as exc:
                    problems.append(f"job.data[{i}]: {exc}")
            elif not folder.exists():
                problems.append(f"job.data[{i}]: {'manifest' if is_manifest(folder) else 'folder'} {str(folder)!r} does not exist")
            elif not folder.is_dir() and not is_manifest(folder):
                problems.append(f"job.data[{i}]: {str(folder)!r} is a file, not a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
            data.append(folder)
    device = doc.get("device", "auto")
    if isinstance(device, str):
        try:
            check_device_name(canonical_device(device))
        except UsageError as exc:
            problems.append(f"job.device: {exc}")

    backbones: list[BackboneSpec] = []
    if isinstance(doc.get("backbones", []), list) and not doc.get("backbones"):
        problems.append("job.backbones: none given; add a [[backbones]] table with model = \"resnet50\"")
    for where, b in _tables(doc, "backbones", BACKBONE_KEYS, problems):
        model = b.get("model")
        if not isinstance(model, str):
            problems.append(f"{where}.model: missing; e.g. model = \"resnet50\"")
            continue
        try:
            model = check_model_name(model)
        except BackboneError as exc:
            problems.append(f"{where}.model: {exc}")
        options = _options(ExtractOptions, b, where, problems)
        if options is not None:
            backbones.append(BackboneSpec(model, options))

    heads: list[HeadSpec] = []
    for where, h in _tables(doc, "heads", HEAD_KEYS, problems):
        options = _options(FitOptions, h, where, problems)
        if options is None:
            continue
        name = str(h.get("name", options.clf))
        problem = name_problem(name)
        if problem:
            problems.append(f"{where}.name: {problem}")
        elif any(x.name == name for x in heads):
            problems.append(f"{where}.name: {name!r} is used twice; give each head a distinct name")
        heads.append(HeadSpec(name, {k: v for k, v in h.items() if k not in ("name", "clf")}, options))

    finetune = None
    raw_ft = doc.get("finetune")
    if isinstance(raw_ft, dict):
        _check_table(raw_ft, FINETUNE_KEYS, "finetune", problems)
        from_head = raw_ft.get("from_head", heads[0].name if heads else None)
        if from_head is None:
            problems.append("finetune: needs a head to start from; add a [[heads]] table")
        elif not any(h.name == from_head for h in heads):
            problems.append(f"finetune.from_head: no head named {from_head!r} (heads: {', '.join(h.name for h in heads) or 'none'})")
        options = _options(FinetuneOptions, raw_ft, "finetune", problems)
        if options is not None:
            try:
                options.resolve()  # the combination (e.g. per-optimizer learning rates) is valid
            except UsageError as exc:
                problems.append(f"finetune: {exc}")
        finetune = FinetuneSpec(str(from_head), options or FinetuneOptions())

    name = str(doc.get("name", path.stem))
    problem = name_problem(name)
    if problem:
        problems.append(f"job.name: {problem}" if "name" in doc else f"job file name {path.name!r}: {problem}; or set name = \"...\" in it")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise JobFileError(f"job file {str(path)!r} has {len(problems)} problem(s); nothing was run:\n{lines}")
    return JobSpec(path=path.resolve(), name=name, data=data, cache_dir=resolve(doc.get("cache_dir", "cache")),
                   out_dir=resolve(doc.get("out_dir", f"runs/{name}")), device=device, workers=doc.get("workers"), report=doc.get("report", True),
                   backbones=backbones, heads=heads, finetune=finetune)
