"""Saving and loading heads with provenance, and checking they fit a cache.

A head artifact is one file written atomically with ``torch.save`` and read with
``torch.load(weights_only=True)``: plain dicts, strings, numbers and tensors only. The
scikit-learn head is stored as its arrays (scaler mean/scale, coefficients), not pickled,
so loading an artifact can never execute code; nor can rebuilding the backbone it names
without the user's consent (``LoadedHead.load_backbone``: ``hub:`` entries run code).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import MODEL_ARTIFACT_FORMAT, Backbone, HubTrust, check_artifact_backbone, file_digest, load_backbone, torch_load_quietly
from ..errors import CacheError, IncompatibleError, UsageError, command_hint
from ..provenance import HEAD_IDENTITY
from ..store import ensure_free_space, payload_bytes, weights_identity, write_bytes_atomically
from .estimators import make_head

HEAD_FORMAT = "featcache.head"
HEAD_SCHEMA = 1
MODEL_SCHEMA = 1  # fine-tuned model: backbone state + head (format MODEL_ARTIFACT_FORMAT)
# Provenance that must agree between a head and a cache it is applied to.


def _to_plain(obj: Any) -> Any:
    """numpy -> tensors/lists so torch.load(weights_only=True) accepts the file."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fiub":
            return torch.from_numpy(np.ascontiguousarray(obj))
        return [_to_plain(x) for x in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _from_plain(v) for k, v in obj.items()}
    return obj


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A head's ``get_state()`` for torch.save: its state_dict as CPU tensors, the rest plain."""
    return {k: ({n: t.detach().cpu() for n, t in v.items()} if k == "state_dict" else _to_plain(v)) for k, v in state.items()}


def save_blob(path: Path, blob: dict[str, Any]) -> Path:
    ensure_free_space(path, payload_bytes(blob))  # before serialising a large blob at all
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return write_bytes_atomically(path, buffer.getbuffer())


def artifact_id(path: Path) -> str:
    """Content identity of a head or model file (what a fine-tune and its checkpoint were made from)."""
    return file_digest(path)[:16]


def save_head(path: str | os.PathLike, head, kind: str, params: dict[str, Any], provenance: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    state = head.get_state()
    blob = {
        "format": HEAD_FORMAT,
        "schema_version": HEAD_SCHEMA,
        "kind": kind,
        "params": _to_plain(params),
        "state": _plain_state(state),
        "provenance": _to_plain(provenance),
        "metrics": _to_plain(metrics),
        "extra": _to_plain(extra or {}),
    }
    return save_blob(path, blob)


class LoadedHead:
    """A fitted head plus what it was fitted on (``provenance``) and how well (``metrics``)."""

    def __init__(self, path: Path, head, kind: str, provenance: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]):
        self.path, self.head, self.kind = path, head, kind
        self.provenance, self.metrics, self.extra = provenance, metrics, extra

    @property
    def classes_(self) -> np.ndarray:
        """Class names in output order."""
        names = self.provenance["classes"]
        return np.array([names[int(i)] for i in self.head.classes_], dtype=object)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(embeddings)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(embeddings).argmax(axis=1)]

    def load_backbone(self, trust_hub: HubTrust = False) -> Backbone:
        """The backbone this head was fitted on, rebuilt from its provenance; weights that no
        longer match (a replaced weights file) are refused, and so is a ``hub:`` backbone
        unless ``trust_hub`` consents (the file names it, not the user: see
        ``backbones.check_artifact_backbone``), before any of its code is imported."""
        prov = self.provenance
        check_artifact_backbone(prov["model"], self.path, trust_hub)
        layers = [prov["layer"]] if prov.get("layer") else []
        backbone = load_backbone(prov["model"], prov.get("weights_spec") or prov["weights"], seed=int(prov.get("seed") or 0), layers=layers,
                                 token_pool=prov.get("token_pool") or "cls", trust_hub=trust_hub)
        if backbone.weights_id != prov["weights"]:
            raise IncompatibleError(f"head {str(self.path)!r} was fitted on weights {prov['weights']!r} but {prov.get('weights_spec')!r} now gives "
                                    f"{backbone.weights_id!r}; restore those weights or refit the head")
        return backbone

    def check_cache(self, cache_meta: dict[str, Any], cache_path: str | os.PathLike) -> None:
        check_head_matches(self.provenance, cache_meta, self.path, Path(cache_path))


def check_head_matches(head_prov: dict[str, Any], cache_meta: dict[str, Any], head_path: Path, cache_path: Path) -> None:
    """Refuse a cache of another backbone, weights, preprocessing, width or class set."""
    for key in HEAD_IDENTITY:
        held, given = (weights_identity(head_prov), weights_identity(cache_meta)) if key == "weights" else (head_prov.get(key), cache_meta.get(key))
        if held != given:
            raise IncompatibleError(
                f"head {str(head_path)!r} was fitted on {key}={held!r} but cache {str(cache_path)!r} has "
                f"{key}={given!r}; use a cache extracted with the head's backbone and weights"
            )
    if list(head_prov.get("classes", [])) != list(cache_meta.get("classes", [])):
        raise IncompatibleError(
            f"head {str(head_path)!r} knows classes {head_prov.get('classes')} but cache {str(cache_path)!r} has "
            f"{cache_meta.get('classes')}; refit the head on this cache"
        )


def _make_loaded_head(kind: str, params: dict[str, Any], state: dict[str, Any]):
    params = _from_plain(params)
    for key in ("hidden", "dropout", "Cs", "k"):
        if key in params and isinstance(params[key], (list, np.ndarray)):
            params[key] = tuple(np.asarray(params[key]).tolist())
    if "device" in params:  # a head fitted on a GPU must still load on a CPU-only machine
        params["device"] = "auto"
    head = make_head(kind, **params)
    head.set_state({k: (v if k == "state_dict" else _from_plain(v)) for k, v in state.items()})
    return head


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Load a head artifact written by ``fit-head``, or the head of a fine-tuned model
    written by ``finetune`` (its provenance then names the model file as the weights).

    Raises:
        CacheError: missing, unreadable or not a featcache head/model.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"head {str(path)!r} is a folder; pass a head .pt file written by fit-head or finetune")
    if not path.is_file():
        raise UsageError(f"head {str(path)!r} does not exist; create one with `{command_hint(f'fit-head CACHE --out {path}')}`")
    try:
        blob = torch_load_quietly(path)
    except Exception as exc:
        raise CacheError(f"{str(path)!r} is not a featcache head (cannot load it safely: {type(exc).__name__}); pass a file written by fit-head or finetune") from exc
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == MODEL_ARTIFACT_FORMAT:
        if int(blob.get("schema_version", 0)) > MODEL_SCHEMA:
            raise CacheError(f"model {str(path)!r} uses schema {blob['schema_version']}, newer than this featcache ({MODEL_SCHEMA}); upgrade featcache")
        head = _make_loaded_head(blob["head"]["kind"], blob["head"]["params"], blob["head"]["state"])
        provenance = {**_from_plain(blob["provenance"]), "weights_spec": str(path.resolve())}
        return LoadedHead(path, head, blob["head"]["kind"], provenance, _from_plain(blob["metrics"]), _from_plain(blob["extra"]))
    if fmt != HEAD_FORMAT:
        raise CacheError(f"{str(path)!r} is not a featcache head (no featcache.head marker); pass a file written by fit-head or finetune")
    if int(blob.get("schema_version", 0)) > HEAD_SCHEMA:
        raise CacheError(f"head {str(path)!r} uses schema {blob['schema_version']}, newer than this featcache ({HEAD_SCHEMA}); upgrade featcache")
    head = _make_loaded_head(blob["kind"], blob["params"], blob["state"])
    return LoadedHead(path, head, blob["kind"], _from_plain(blob["provenance"]), _from_plain(blob["metrics"]), _from_plain(blob["extra"]))


def save_model_artifact(path: str | os.PathLike, backbone_info: dict[str, Any], backbone_state: dict[str, torch.Tensor], head_kind: str,
                        head_params: dict[str, Any], head_state: dict[str, Any], provenance: dict[str, Any], metrics: dict[str, Any],
                        extra: dict[str, Any] | None = None) -> Path:
    """A fine-tuned model: everything ``predict``, ``evaluate`` and ``extract --model PATH`` need.

    ``backbone_info`` holds model, weights_id, preprocessing and embed_dim; the backbone
    state is the headless model's (so it loads into a stock architecture).
    """
    path = Path(path)
    blob = {
        "format": MODEL_ARTIFACT_FORMAT,
        "schema_version": MODEL_SCHEMA,
        "backbone": _to_plain(backbone_info),
        "backbone_state": {k: v.detach().cpu().contiguous() for k, v in backbone_state.items()},
        "head": {"kind": head_kind, "params": _to_plain(head_params), "state": _plain_state(head_state)},
        "provenance": _to_plain(provenance),
        "metrics": _to_plain(metrics),
        "extra": _to_plain(extra or {}),
    }
    return save_blob(path, blob)
