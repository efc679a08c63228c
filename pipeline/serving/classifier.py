"""One interface for a trained classifier, whatever file it came from.

``load_classifier(path)`` gives a :class:`Classifier` for a head or fine-tuned model file
(``.pt``: the backbone rebuilt from the file's provenance on the fastest engine measured
here, then the head) or for a model written by ``export-model`` (``.onnx``: ONNX Runtime,
CPU). ``export-model`` checks what it wrote through it and ``serve`` runs either kind through
it. Every classifier takes images the way extraction does — :meth:`Classifier.pixels`
decodes bytes (``images.decode_image``: EXIF, CMYK, alpha, decompression bombs) and resizes
and crops them (``Preprocessing.pixels``) to uint8 — and :meth:`Classifier.probabilities`
turns a uint8 batch [B, 3, H, W] at the crop size into probabilities [B, n_classes], columns
in the order of ``classes``, as ``predict`` computes them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..backbones import Backbone, Engine, HubTrust, Preprocessing, build_engine, choice_path
from ..devices import resolve_device
from ..errors import CacheError, UsageError, command_hint
from ..heads import LoadedHead, artifact_id, head_scorer, load_head
from ..images import DEFAULT_MAX_PIXELS, decode_image
from ..inference import engine_context, engines_home, resolve_precision

logger = logging.getLogger(__name__)

METADATA_FORMAT = "featcache.classifier"  # marks a featcache ONNX model's metadata_props
METADATA_SCHEMA = 1
JSON_KEYS = ("schema_version", "classes", "preprocessing", "provenance")  # metadata values stored as JSON (the rest are plain strings)
INPUT_KINDS = ("float", "uint8")
SERVICE_IMAGES = 1_000_000  # what a service's life is taken to be when choosing an engine: enough images to repay any build


def _plain(obj: Any) -> Any:
    """``obj`` with only JSON types (numpy scalars and arrays, paths and the like as text)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else str(o)))


def preprocessing_metadata(pre: Preprocessing, input_kind: str) -> dict[str, Any]:
    """Everything a client needs to feed the model: every field of the preprocessing (none
    left out at its default, unlike a cache's record) and what the input tensor holds."""
    return {
        "resize_size": list(pre.resize_size), "crop_size": list(pre.crop_size), "interpolation": pre.interpolation, "antialias": bool(pre.antialias),
        "mean": [float(m) for m in pre.mean], "std": [float(s) for s in pre.std], "input_space": pre.input_space, "input_range": float(pre.input_range),
        "source": pre.source,
        # uint8: RGB pixels 0-255 after resize and crop, normalised inside the graph; float: already normalised
        # ((x / 255 * input_range, channels reversed for BGR, then (x - mean) / std)
        "input": input_kind, "layout": "NCHW", "channels": "RGB" if input_kind == "uint8" else pre.input_space, "decode": "exact",
    }


def classifier_metadata(loaded: LoadedHead, input_kind: str) -> dict[str, Any]:
    """Classes, preprocessing and provenance of a head or model file (what ``export-model``
    writes into the ONNX file's ``metadata_props`` and ``serve`` answers on ``/metadata``)."""
    prov = loaded.provenance
    val = loaded.metrics.get("val") or loaded.metrics.get("test") or {}
    provenance = {
        **_plain(prov),
        "head_kind": loaded.kind,
        "artifact": str(Path(loaded.path).resolve()),
        "artifact_kind": "fine-tuned model" if "base_head" in prov else "head",
        "artifact_sha256": artifact_id(Path(loaded.path)),
        "val_accuracy": val.get("accuracy"),
    }
    return {
        "format": METADATA_FORMAT, "schema_version": METADATA_SCHEMA, "classes": [str(c) for c in prov["classes"]],
        "preprocessing": preprocessing_metadata(Preprocessing.from_dict(prov["preprocessing"]), input_kind),
        "provenance": provenance, "featcache_version": __version__,
    }


class Classifier:
    """Images in, class probabilities out. ``classes``: names in column order;
    ``preprocessing``: how images become the uint8 pixels :meth:`probabilities` takes."""

    classes: list[str]
    preprocessing: Preprocessing
    source: Path
    engine_name: str
    precision: str = "fp32"  # what the backbone runs in

    draft_size: int | None = None  # decode JPEGs at a reduced DCT scale, as the head's cache was (--decode draft)

    def pixels(self, data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """One image's bytes as uint8 [3, H, W] at the crop size, exactly as extraction decodes,
        resizes and crops. Raises ``images.DecodeError`` (not an image, truncated, over
        ``max_pixels``, ...). PIL releases the interpreter lock while it decodes and resizes, so
        threads decode side by side."""
        return self.preprocessing.pixels()(decode_image(data, max_pixels, self.draft_size))

    def probabilities(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """float64 [B, n_classes] for uint8 pixels [B, 3, H, W] at the crop size."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Classes, preprocessing and provenance (JSON types only)."""
        raise NotImplementedError

    @property
    def crop_hw(self) -> tuple[int, int]:
        c = list(self.preprocessing.crop_size)
        return (int(c[0]), int(c[-1]))

    def check_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(pixels)
        if t.dtype != torch.uint8 or t.dim() != 4 or tuple(t.shape[1:]) != (3, *self.crop_hw):
            raise UsageError(f"probabilities() takes uint8 pixels [B, 3, {self.crop_hw[0]}, {self.crop_hw[1]}] (Classifier.pixels), "
                             f"got {t.dtype} {list(t.shape)}")
        return t


class TorchClassifier(Classifier):
    """A head or fine-tuned model file: its backbone on an engine (in the precision and with the
    decoding its cache recorded), then the head's scorer (``predict``'s numbers)."""

    def __init__(self, loaded: LoadedHead, backbone: Backbone, engine: Engine):
        self.loaded, self.backbone, self.engine = loaded, backbone, engine
        self.source = Path(loaded.path)
        self.classes = [str(c) for c in loaded.provenance["classes"]]
        self.preprocessing = backbone.preprocessing
        self.engine_name = engine.name
        self.precision = engine.precision.name
        self.draft_size = backbone.preprocessing.draft_size if loaded.provenance.get("decode") == "draft" else None
        self.score = head_scorer(loaded.head, len(self.classes))

    def probabilities(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        t = self.check_pixels(pixels)
        rows = self.engine.embed(self.preprocessing.normalize(t.to(self.engine.device)))
        return self.score(rows).astype(np.float64)

    def metadata(self) -> dict[str, Any]:
        if not hasattr(self, "_metadata"):  # hashes the artifact: once
            self._metadata = classifier_metadata(self.loaded, "uint8")
        return self._metadata


def _engine_for(backbone: Backbone, loaded: LoadedHead, engine: str, device: torch.device, batch_size: int,
                precision: str | None = None) -> Engine:
    """``auto``: the engine measured fastest for this backbone on this machine (``featcache
    engines``, or an earlier ``extract``), else eager — a service does not stop to measure
    at start; a named engine is built and checked against eager as ``extract`` builds it.
    ``precision``: as ``--precision`` (None: the precision the head's cache was extracted in)."""
    cache_dir = engines_home(loaded.provenance)
    chosen = resolve_precision(precision or loaded.provenance.get("precision") or "fp32", device)
    ctx = engine_context(backbone, device, chosen, batch_size, cache_dir)
    if engine == "eager":
        return ctx.eager()
    if engine == "auto" and not choice_path(ctx).exists():
        prov = loaded.provenance
        model = (f"--model {loaded.path}" if "base_head" in prov else
                 f"--model {prov['model']} --weights {prov.get('weights_spec') or prov['weights']}" + (f" --seed {prov['seed']}" if prov.get("seed") else ""))
        model += f" --precision {chosen.name}" if chosen.name != "fp32" else ""
        logger.info(f"engine auto -> eager: no engine was measured for this backbone in {chosen.name} on this machine "
                    f"(`{command_hint(f'engines {model} --batch-size {batch_size} --cache-dir {cache_dir}')}` measures once; the service then runs the fastest)")
        return ctx.eager()
    # a long-lived service repays rebuilding a remembered engine whose export/compile cache is cold
    return build_engine(engine, ctx, SERVICE_IMAGES)


def load_torch_classifier(path: str | os.PathLike, trust_hub: HubTrust = False, engine: str = "auto", device: str = "auto",
                          batch_size: int = 32, precision: str | None = None) -> TorchClassifier:
    loaded = load_head(path)
    backbone = loaded.load_backbone(trust_hub)
    dev = resolve_device(device)
    return TorchClassifier(loaded, backbone, _engine_for(backbone, loaded, engine, dev, batch_size, precision))


# ----------------------------------------------------------------------------- ONNX files


def needs_onnx(what: str, packages: tuple[str, ...] = ("onnx", "onnxruntime")) -> None:
    """A one-line error naming the extra when a package ``what`` needs is missing."""
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"{what} needs {', '.join(missing)}: pip install 'featcache[onnx]'")


def graph_digest(model) -> str:
    """SHA-256 of an ONNX model without its metadata_props: the graph and weights as exported
    (recorded in the metadata, checked on load: a changed byte is refused, never served)."""
    saved = list(model.metadata_props)
    del model.metadata_props[:]
    try:
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    finally:
        model.metadata_props.extend(saved)


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in JSON_KEYS else v) for k, v in props.items()}


def read_onnx(path: str | os.PathLike, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """(ModelProto, decoded metadata) of a model written by ``export-model``; refuses a file
    that is not one, of a newer schema, or whose graph is not what was exported.

    Raises:
        UsageError: missing file, onnx not installed; CacheError: not a featcache model, damaged.
    """
    needs_onnx("reading an ONNX model", ("onnx",))
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX model {str(path)!r} does not exist; write one with `featcache export-model HEAD --out {path}`")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as exc:
        raise CacheError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__}); pass a file written by export-model") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("format") != METADATA_FORMAT:
        raise CacheError(f"{str(path)!r} is an ONNX model but not one featcache exported (no {METADATA_FORMAT!r} metadata); "
                         "pass a file written by export-model")
    try:
        meta = decode_metadata(props)
    except ValueError as exc:
        raise CacheError(f"{str(path)!r}: its featcache metadata is damaged ({exc}); export the model again") from exc
    if int(meta.get("schema_version", 0)) > METADATA_SCHEMA:
        raise CacheError(f"{str(path)!r} uses metadata schema {meta['schema_version']}, newer than this featcache ({METADATA_SCHEMA}); upgrade featcache")
    if verify and graph_digest(model) != meta.get("graph_sha256"):
        raise CacheError(f"{str(path)!r}: its graph or weights are not what export-model wrote (SHA-256 differs from the one in its metadata); "
                         "export the model again")
    return model, meta


class OnnxClassifier(Classifier):
    """A model written by ``export-model``, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        needs_onnx("running an ONNX model")
        import onnxruntime as ort

        self.source = Path(path)
        model, self.meta = read_onnx(self.source)
        pre = dict(self.meta["preprocessing"])
        self.input_kind = pre["input"]
        self.preprocessing = Preprocessing(**{k: pre[k] for k in ("resize_size", "crop_size", "mean", "std", "interpolation", "antialias", "source",
                                                                   "input_space", "input_range")})
        self.classes = [str(c) for c in self.meta["classes"]]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.engine_name = "onnxruntime"
        self._check_signature()

    def _check_signature(self) -> None:
        """The graph takes what its metadata says and gives one column per class."""
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        want = "tensor(uint8)" if self.input_kind == "uint8" else "tensor(float)"
        shape_ok = list(inp.shape[1:]) == [3, *self.crop_hw]
        if inp.type != want or not shape_ok or out.shape[-1] != len(self.classes):
            raise CacheError(f"{str(self.source)!r}: its graph takes {inp.type} {inp.shape} and gives {out.shape}, but its metadata says "
                             f"{want} [batch, 3, {self.crop_hw[0]}, {self.crop_hw[1]}] and {len(self.classes)} classes; export the model again")

    def probabilities(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        t = self.check_pixels(pixels)
        x = t.numpy() if self.input_kind == "uint8" else self.preprocessing.normalize(t).numpy()
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0], dtype=np.float64)

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items()}


def load_classifier(path: str | os.PathLike, *, trust_hub: HubTrust = False, engine: str = "auto", device: str = "auto", batch_size: int = 32, precision: str | None = None) -> Classifier:
    """A classifier for a head or fine-tuned model file (``.pt``), or a model written by
    ``export-model`` (``.onnx``). ``trust_hub``: consent to run the code of a ``hub:``
    backbone a ``.pt`` file names (an ONNX file runs no Python code). ``engine``/``device``
    apply to ``.pt`` files (an ONNX file runs on ONNX Runtime's CPU provider), and so does
    ``precision`` (None: the head's cache's; ``auto``: bf16 where the hardware runs it natively)."""
    if Path(path).suffix.lower() == ".onnx":
        if precision is not None:
            raise UsageError(f"--precision applies to a head or model file (.pt); {str(path)!r} runs in the precision it was exported in")
        classifier: Classifier = OnnxClassifier(path)
    else:
        classifier = load_torch_classifier(path, trust_hub, engine, device, batch_size, precision)
    return classifier
