"""``export-model``: a head or fine-tuned model as one ONNX graph from images to probabilities.

The graph is the backbone as the head's provenance names it (tapped layer and pooling
included: ``LoadedHead.load_backbone`` rebuilds it) followed by the head: logreg as its
equivalent linear layer with the standardisation folded in (computed in float64), linear and
mlp heads as their torch modules, kNN as a matmul against its normalised training rows and a
top-k vote weighted exp(similarity / T) as ``KNNHead.predict_proba`` (only where the rows fit
in the graph). Its input is float NCHW normalised at the crop size or, with ``uint8``, uint8
pixels with the normalisation (mean/std, input range and channel order) inside the graph.

Exported with ``torch.onnx.export(..., dynamo=True)`` at opset 18 with a symbolic batch axis
(traced with a batch of 2, as timm's ``onnx_export`` does: a batch of 1 would be specialised).
Classes, the full preprocessing, the provenance of backbone and head, featcache's version and
the check's figures travel in the model's ``metadata_props`` (as Ultralytics' exporter does),
with a SHA-256 of the graph that readers check. Before anything is written the model runs in
ONNX Runtime on a probe batch of real images, decoded and resized as extraction does them,
and its probabilities are compared with what ``predict`` computes (the eager backbone, then
the head's own ``predict_proba``); a model that differs is not written.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, HubTrust, Preprocessing
from ..choices import MODEL_EXPORT_FORMATS
from ..errors import ExitCode, FeatcacheError, UsageError
from ..heads import KNNHead, LoadedHead, LogRegHead, TorchHead, full_proba, load_head
from ..images import DEFAULT_MAX_PIXELS, DecodeError, is_manifest, load_image, scan_source
from ..inference import embed_batch, prepare_model
from ..options import build, check_types, choose, require
from ..store import atomic_path
from .classifier import classifier_metadata, graph_digest, needs_onnx

logger = logging.getLogger(__name__)

KNN_MAX_BYTES = 256 << 20  # training rows a kNN graph may hold
PROBE_IMAGES = 8
OPSET = 18  # torch's dynamo exporter's own
TOLERANCE = 1e-4  # max |Δp| against predict on the probe batch (fp32), as the engines are checked against eager


class ExportError(FeatcacheError):
    """The exporter failed, or the exported model does not compute what ``predict`` does:
    nothing was written (exit 1: a bug, in featcache or the exporter)."""

    exit_code = ExitCode.INTERNAL


@dataclass(frozen=True)
class ExportOptions:
    """How ``export-model`` writes a head or model: the command's flags."""

    format: str = "onnx"
    uint8: bool = False  # the graph takes uint8 pixels and normalises them itself
    probe: tuple[str, ...] = ()  # images (files, folders, manifests) to check the export on; default: the head's data root
    probe_images: int = PROBE_IMAGES  # how many of them

    def __post_init__(self) -> None:
        check_types(self)
        choose(self, "format", MODEL_EXPORT_FORMATS)
        require(self.probe_images >= 1, f"--probe-images must be 1 or more, got {self.probe_images}")

    @property
    def input_kind(self) -> str:
        return "uint8" if self.uint8 else "float"


@dataclass
class ExportResult:
    path: str
    input_kind: str
    head_kind: str
    classes: list[str]
    bytes: int
    probe_images: list[str]
    max_abs_diff: float  # max |Δp| against predict over the probe batch (and its first image alone)
    top1_agree: float  # share of probe images whose top class agrees with predict
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the graph


class Normalize(nn.Module):
    """``Preprocessing.normalize`` in graph ops: uint8 -> float / 255 (x input range),
    channels reversed for BGR models, then (x - mean) / std."""

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_range = float(pre.input_range)
        self.bgr = pre.input_space == "BGR"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0
        if self.input_range != 1.0:
            x = x * self.input_range
        if self.bgr:
            x = x[:, [2, 1, 0]]
        return (x - self.mean) / self.std


class Rows(nn.Module):
    """The backbone's output as [B, D] (the first output of models that return several)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.flatten(out, 1)


class LinearSoftmax(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.weight.T + self.bias, dim=1)


class ModuleSoftmax(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.module(x), dim=1)


class KNNVote(nn.Module):
    """``KNNHead.predict_proba``: cosine similarity to the normalised training rows, the top
    ``k`` vote for their class with weight exp(similarity / T), votes normalised."""

    def __init__(self, train: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, n_classes: int):
        super().__init__()
        self.register_buffer("rows", train.to(torch.float32).contiguous())
        self.register_buffer("labels", labels.to(torch.int64))
        self.register_buffer("classes", torch.arange(n_classes, dtype=torch.int64))
        self.k, self.temperature = int(min(k, len(train))), float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = nn.functional.normalize(x, dim=1)
        sim, idx = (q @ self.rows.T).topk(self.k, dim=1)
        weights = torch.exp(sim / self.temperature)
        onehot = (self.labels[idx].unsqueeze(-1) == self.classes).to(torch.float32)  # [B, k, C]: no [N, C] table in the graph
        votes = (weights.unsqueeze(-1) * onehot).sum(1)
        return votes / votes.sum(1, keepdim=True).clamp_min(1e-30)


class AllColumns(nn.Module):
    """The head's columns placed among all the classes (``full_proba``): a class the head
    never saw gets 0."""

    def __init__(self, index: np.ndarray):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.int64))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p, torch.zeros_like(p[:, :1])], dim=1)[:, self.index]


class ExportedClassifier(nn.Module):
    """[normalise] -> backbone -> head (probabilities over every class: ``head_module``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize: nn.Module | None = None):
        super().__init__()
        self.normalize, self.backbone, self.head = normalize, Rows(backbone), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        return self.head(self.backbone(x))


def logreg_module(head: LogRegHead) -> nn.Module:
    """softmax(x W'^T + b') with W' = W / scale and b' = b - W' mean (float64, then float32):
    the standardise + linear layer folded into one."""
    mean, scale, coef, intercept = (np.asarray(a, dtype=np.float64) for a in head.as_linear())
    weight = coef / scale[None, :]
    return LinearSoftmax(weight, intercept - weight @ mean)


def knn_module(head: KNNHead, source: Path) -> nn.Module:
    n_rows, max_bytes = len(head.train_labels_), KNN_MAX_BYTES
    need = n_rows * int(head.n_features_in_) * 4
    if need > max_bytes:
        raise UsageError(f"kNN head {str(source)!r} holds {n_rows:,} training rows x {head.n_features_in_} ({need / 2**20:,.0f} MiB), over the "
                         f"{max_bytes / 2**20:,.0f} MiB an exported graph may hold; serve the head file itself (`featcache serve {source}`) or "
                         "export a logreg, linear or mlp head fitted on the same cache")
    return KNNVote(head.training_rows().cpu(), head.train_labels_.cpu(), head.k_, head.temperature, len(head.classes_))


def head_module(loaded: LoadedHead) -> nn.Module:
    """The head's probabilities over all the classes, as a torch module on the CPU."""
    head = loaded.head
    if isinstance(head, LogRegHead):
        module: nn.Module = logreg_module(head)
    elif isinstance(head, TorchHead):
        module = ModuleSoftmax(copy.deepcopy(head.module_).cpu().float().eval())
    elif isinstance(head, KNNHead):
        module = knn_module(head, Path(loaded.path))
    else:
        raise UsageError(f"{str(loaded.path)!r} holds a {loaded.kind!r} head, which export-model cannot write; export a logreg, linear, mlp or knn head")
    n_classes = len(loaded.provenance["classes"])
    seen = np.asarray(head.classes_, dtype=int)
    if np.array_equal(seen, np.arange(n_classes)):
        return module
    index = np.full(n_classes, len(seen))
    index[seen] = np.arange(len(seen))
    return nn.Sequential(module, AllColumns(index))


# ----------------------------------------------------------------------------- probe images


def _candidates(items: Sequence[str], data_root: str | None) -> list[tuple[str, Callable[[], Any]]]:
    """(name, decode) of every image the probe may take, in scan order."""
    found: list[tuple[str, Callable[[], Any]]] = []
    sources = list(items)
    if not sources:
        if not data_root or not Path(data_root).exists():
            where = f"its data root {data_root!r} is gone" if data_root else "it records no data root"
            raise UsageError(f"export-model checks the exported model on a few real images, but {where}; pass --probe FOLDER_OR_FILES "
                             "(images like the ones it will classify)")
        sources = [data_root]
    for item in sources:
        p = Path(item).expanduser()
        if p.is_file() and not is_manifest(p):
            found.append((str(p), lambda p=p: load_image(p, DEFAULT_MAX_PIXELS)))
            continue
        if not p.exists():
            raise UsageError(f"--probe {item!r} does not exist; pass image files, a folder of images or a manifest")
        scan = scan_source(p)
        for r in scan.records:
            if r.container and r.offset >= 0:
                member = (str(scan.root / r.container), r.offset, r.size)
                found.append((r.relpath, lambda m=member: load_image(m[0], DEFAULT_MAX_PIXELS, member=m)))
            elif not r.container and scan.spec is None:
                path = scan.root / r.relpath
                found.append((str(path), lambda path=path: load_image(path, DEFAULT_MAX_PIXELS)))
    return found


def probe_pixels(items: Sequence[str], data_root: str | None, pre: Preprocessing, n: int) -> tuple[list[str], torch.Tensor]:
    """Up to ``n`` images spread over the candidates, decoded, resized and cropped exactly as
    extraction does them: (names, uint8 [B, 3, H, W])."""
    found = _candidates(items, data_root)
    if not found:
        raise UsageError("export-model found no probe images there; pass --probe FOLDER_OR_FILES with a few images")
    picks = sorted(set(np.linspace(0, len(found) - 1, min(len(found), 4 * n)).round().astype(int).tolist()))
    to_pixels, names, pixels, failures = pre.pixels(), [], [], []
    for i in picks:
        if len(pixels) == n:
            break
        name, decode = found[i]
        try:
            pixels.append(to_pixels(decode()))
            names.append(name)
        except (DecodeError, OSError) as exc:
            failures.append(f"{name}: {exc}")
    if not pixels:
        raise UsageError(f"none of the probe images could be decoded ({failures[0]}); pass --probe FOLDER_OR_FILES with readable images")
    return names, torch.stack(pixels)


# ----------------------------------------------------------------------------- export


def _reference(loaded: LoadedHead, backbone: Backbone, pixels: torch.Tensor) -> np.ndarray:
    """What ``predict`` computes: the eager backbone on the normalised pixels, then the
    head's own ``predict_proba`` over all the classes."""
    cpu = torch.device("cpu")
    rows = embed_batch(prepare_model(backbone, cpu), backbone.preprocessing.normalize(pixels), cpu)
    return full_proba(loaded.head, rows, len(loaded.provenance["classes"]))


def _export(model: nn.Module, example: torch.Tensor, input_name: str, opset: int):
    """The dynamo exporter's ModelProto, batch axis symbolic."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's chatter
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[input_name], output_names=["probabilities"],
                                        dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        return program.model_proto
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"torch.onnx.export (dynamo) cannot export this model: {type(exc).__name__}: {first}") from exc


def _run(session, input_name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(None, {input_name: np.ascontiguousarray(x)})[0], dtype=np.float64)


def export_model(path: str | Path, out: str | Path | None = None, options: ExportOptions | dict | None = None, *, trust_hub: HubTrust = False, **fields: Any) -> ExportResult:
    """Write the head or fine-tuned model at ``path`` as one ONNX file (``out``, default
    beside it with the suffix ``.onnx``), checked in ONNX Runtime against ``predict`` first.
    ``trust_hub``: consent to run the code of a ``hub:`` backbone the file names.

    Raises:
        UsageError (no probe images, a kNN head too large, onnx missing), CacheError,
        UntrustedCodeError, ExportError (exporter failed, or the model differs: not written),
        StorageError.
    """
    t0 = time.perf_counter()
    options = build(ExportOptions, options, **fields)
    needs_onnx("export-model", ("onnx", "onnxscript", "onnxruntime"))
    import onnxruntime as ort

    path = Path(path)
    loaded = load_head(path)
    out = Path(out) if out is not None else path.with_suffix(".onnx")
    if out.resolve() == path.resolve():
        raise UsageError(f"--out {str(out)!r} is the head itself; choose another file name (model.onnx)")
    backbone = loaded.load_backbone(trust_hub)
    pre = backbone.preprocessing
    head = head_module(loaded)
    names, pixels = probe_pixels(options.probe, loaded.provenance.get("data_root"), pre, options.probe_images)
    reference = _reference(loaded, backbone, pixels)

    model = ExportedClassifier(backbone.model.cpu().eval(), head, Normalize(pre) if options.uint8 else None).eval()
    float_pixels = pre.normalize(pixels)
    x = pixels if options.uint8 else float_pixels
    input_name = "pixels" if options.uint8 else "images"
    example = x[:2] if len(x) >= 2 else torch.cat([x, x])  # a batch of 2 keeps the batch axis symbolic
    logger.info(f"exporting {path.name} ({backbone.name} + {loaded.kind} head) to ONNX, opset {OPSET}, {options.input_kind} input")
    proto = _export(model, example.contiguous(), input_name, OPSET)

    x_np = x.numpy()
    try:
        graph = proto.SerializeToString()
    except ValueError as exc:
        raise ExportError(f"the model is too large for one ONNX file (protobuf's 2 GiB limit): {exc}") from exc
    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        got = _run(session, input_name, x_np)
        alone = _run(session, input_name, x_np[:1])  # the batch axis really is free
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported model: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    diff = float(max(np.abs(got - reference).max(), np.abs(alone - reference[:1]).max())) if got.shape == reference.shape else float("inf")
    agree = float((got.argmax(1) == reference.argmax(1)).mean()) if got.shape == reference.shape else 0.0
    if not diff <= TOLERANCE:
        raise ExportError(f"the exported model differs from predict on {len(names)} probe image(s): max |Δp| = {diff:.3g} (tolerance "
                          f"{TOLERANCE:g}), top-1 agrees on {agree:.0%}; {str(out)!r} was not written")

    metadata = classifier_metadata(loaded, options.input_kind)
    n_classes = len(metadata["classes"])
    metadata["provenance"]["exported"] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "opset": OPSET, "torch_version": str(torch.__version__),
        "onnxruntime_version": ort.__version__, "input_name": input_name, "output_name": "probabilities",
        "check": {"probe_images": len(names), "max_abs_diff": diff, "top1_agree": agree, "tolerance": TOLERANCE},
    }
    metadata["description"] = f"featcache {metadata['provenance']['artifact_kind']}: {backbone.name} + {loaded.kind} head, {n_classes} classes"
    metadata["graph_sha256"] = graph_digest(proto)
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)
    data = proto.SerializeToString()
    with atomic_path(out, need=len(data)) as tmp:
        tmp.write_bytes(data)
    seconds = time.perf_counter() - t0
    logger.info(f"wrote {out} ({len(data) / 2**20:.1f} MiB): max |Δp| {diff:.2g} against predict on {len(names)} probe image(s) in {seconds:.1f}s")
    return ExportResult(str(out), options.input_kind, loaded.kind, metadata["classes"], len(data), names, diff, agree, round(seconds, 3), metadata)
