"""Provenance: what every artifact records about how it was made, and which of it must match.

A cache records its backbone, data and run (``extract.build_meta``); a head inherits the
cache's part of it (:data:`INHERITED_BY_HEADS`) and adds its own; a fine-tuned model, an
export and an import add theirs. The versions and the time are stamped the same way
everywhere (:func:`versions`, :func:`timestamp`), and the checks on load compare the keys
named here: rows share a cache only when :data:`CACHE_IDENTITY` is equal, a head scores
embeddings only when :data:`HEAD_IDENTITY` is, and a head scores cached rows only when
:data:`ROW_NUMBERS` is too (the numbers it was trained on).
"""
from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from typing import Any

# rows share one cache only when these are equal
CACHE_IDENTITY = ("model", "weights", "preprocessing", "embed_dim", "dtype", "precision", "decode", "data_root", "layout", "layer", "layer_pool")
# what a cache written before a key existed holds
RECORDED_DEFAULTS = {"precision": "fp32", "decode": "exact"}
# a head scores embeddings of this backbone only (any data, any run)
HEAD_IDENTITY = ("model", "layer", "layer_pool", "weights", "preprocessing", "embed_dim")
# ...and cached rows only when they were computed the way its training rows were
ROW_NUMBERS = ("precision", "decode")
# what a head copies from the cache it was fitted on
INHERITED_BY_HEADS = ("model", "weights", "weights_spec", "seed", "preprocessing", "embed_dim", "classes", "dtype", "data_root", "layout", "engine",
                      "precision", "decode", "layer", "layer_pool", "token_pool", "manifest_columns")
# the libraries a backbone named with these prefixes comes from
SOURCE_PACKAGES = {"timm:": "timm", "pretrainedmodels:": "pretrainedmodels"}


def recorded(meta: Mapping[str, Any], key: str) -> Any:
    """``meta[key]``, or what an artifact written before the key existed held."""
    value = meta.get(key)
    return RECORDED_DEFAULTS.get(key) if value is None else value


def inherited(cache_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a cache's provenance a head fitted on it carries."""
    return {k: cache_meta.get(k) for k in INHERITED_BY_HEADS}


def versions(*packages: str, model: str = "") -> dict[str, str]:
    """``{"<name>_version": ...}`` for featcache, torch, torchvision, numpy and Python, then
    ``packages`` (``"sklearn"``), and the library a ``timm:``/``pretrainedmodels:`` ``model`` comes from."""
    import numpy
    import torch
    import torchvision

    from . import __version__

    out = {"featcache_version": __version__, "torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__),
           "numpy_version": numpy.__version__, "python_version": platform.python_version()}
    for name in packages:
        if name == "sklearn":
            import sklearn

            out["sklearn_version"] = sklearn.__version__
        else:
            from importlib.metadata import version

            out[f"{name}_version"] = version(name)
    for prefix, package in SOURCE_PACKAGES.items():
        if model.startswith(prefix):
            from importlib.metadata import version

            out[f"{package}_version"] = version(package)
    return out


def timestamp() -> str:
    """Now, as every artifact records it (local time with its UTC offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
