"""What every stage's options dataclass shares: typed fields checked in one place.

A stage's options are a frozen dataclass (``ExtractOptions``, ``FitOptions``,
``FinetuneOptions``) whose ``__post_init__`` checks types, ranges and choices. The CLI
builds one from its flags, a job file's table is checked against the same fields
(:func:`toml_schema`), and the library takes the object whole, so a new option is one
field and one flag.

Field metadata says where an option may also be set:
- ``JOB_LEVEL``: set once at the top of a job file (``device``), not in each table;
- ``OUTSIDE_IDENTITY``: how the work runs, not what it computes (``workers``, ``device``): never part
  of an artifact's identity, so changing it never makes work stale.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, Union

from .choices import canonical, canonical_device
from .errors import UsageError

JOB_LEVEL = "job_level"
OUTSIDE_IDENTITY = "outside_identity"

O = TypeVar("O")


def flag(name: str) -> str:
    """The command-line spelling of a field (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def option_fields(cls: type, *, in_tables: bool = False) -> list[dataclasses.Field]:
    """The fields of an options class; ``in_tables``: only those a job file's table takes."""
    return [f for f in dataclasses.fields(cls) if not (in_tables and f.metadata.get(JOB_LEVEL))]


def fields_outside_identity(cls: type) -> set[str]:
    """Fields that say how the work runs (workers, device): never part of an artifact's identity."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(OUTSIDE_IDENTITY)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), type(None) in typing.get_args(tp)  # noqa: UP007 - a Union built at run time
    return tp, False


def type_problem(value: Any, tp: Any) -> str | None:
    """None when ``value`` fits the annotation ``tp``, else what was expected.

    TOML and the command line give ints for floats (accepted), lists for tuples (accepted),
    and true/false never counts as a number.
    """
    value = _coerce(value, tp)
    tp, optional = _unwrap_optional(tp)
    if value is None:
        return None if optional else f"expected {describe(tp)}, got None"
    origin = typing.get_origin(tp)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)) or any(type_problem(v, item) for v in value):
            return f"expected {describe(tp)}, got {type(value).__name__} {value!r}"
        return None
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    return None if ok else f"expected {describe(tp)}, got {type(value).__name__} {value!r}"


def describe(tp: Any) -> str:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers"}.get(item, "lists of integers" if typing.get_origin(item) is tuple else "values")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """A list field given one value takes it as a one-item list (``lr = 0.01`` for
    ``lr: tuple[float, ...]``; ``hidden = [512, 256]`` for a list of architectures);
    lists become tuples, so frozen options stay hashable."""
    tp, _ = _unwrap_optional(tp)
    if value is None or typing.get_origin(tp) is not tuple:
        return value
    item = typing.get_args(tp)[0]
    if not isinstance(value, (list, tuple)):
        return (value,)
    if typing.get_origin(item) is tuple and value and not any(isinstance(v, (list, tuple)) for v in value):
        return (tuple(value),)
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def check_types(options: Any) -> None:
    """Raise UsageError naming the first field whose value does not fit its annotation
    (after :func:`_coerce`)."""
    hints = _hints(type(options))
    for f in dataclasses.fields(options):
        value = _coerce(getattr(options, f.name), hints[f.name])
        problem = type_problem(value, hints[f.name])
        if problem:
            raise UsageError(f"{flag(f.name)}: {problem}")
        object.__setattr__(options, f.name, value)


def require(ok: bool, message: str) -> None:
    """The one way an options check fails: a UsageError with a message that says the fix."""
    if not ok:
        raise UsageError(message)


def require_choice(name: str, value: Any, choices: Iterable[Any], hint: str = "") -> None:
    choices = tuple(choices)
    require(value in choices, f"{flag(name)} {value!r}: choose one of {', '.join(map(str, choices))}" + (f" ({hint})" if hint else ""))


def choose(options: Any, name: str, choices: Iterable[str], hint: str = "") -> None:
    """Set ``options.<name>`` to its canonical spelling among ``choices`` (the one rule of
    :mod:`pipeline.choices`: case-insensitive) and refuse anything else; None stays None."""
    value = getattr(options, name)
    if value is None:
        return
    choices = tuple(choices)
    value = canonical(value, choices)
    require_choice(name, value, choices, hint)
    object.__setattr__(options, name, value)


def check_device(options: Any) -> None:
    """``options.device`` lower-cased, then checked as :func:`check_device_name`."""
    object.__setattr__(options, "device", canonical_device(options.device))
    check_device_name(options.device)


def check_device_name(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether a GPU is there is checked when it is used)."""
    index = device[5:] if device.startswith("cuda:") else "0"
    require(device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and index.isdigit()),
            f"--device {device!r}: choose auto, cpu or cuda[:N]")


def unknown_keys(given: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """One message per unknown key, with the closest allowed key as a suggestion."""
    allowed = list(allowed)
    out = []
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            out.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(allowed)}"))
    return out


def build(cls: type[O], options: O | Mapping[str, Any] | None = None, **fields: Any) -> O:
    """``options`` (an instance, a mapping of field values, or None for the defaults) with
    ``fields`` replacing some values; unknown names are a UsageError with suggestions."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = dict(options) if isinstance(options, Mapping) else {}
    problems = unknown_keys([*values, *fields], names)
    if problems:
        raise UsageError(f"{cls.__name__}: " + "; ".join(problems))
    base = options if isinstance(options, cls) else cls(**values)
    return dataclasses.replace(base, **fields) if fields else base


def toml_schema(cls: type) -> dict[str, Any]:
    """field name -> annotation, for the fields a job file's table takes."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in option_fields(cls, in_tables=True)}
