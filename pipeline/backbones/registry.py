"""One registry: a model name plus a weights spec becomes a headless backbone.

The embedding is defined once for every family: the *input of the model's final
classification layer* (the layer a transfer-learning head replaces). We find that layer
generically (the last ``nn.Linear`` producing the class logits; squeezenet's final 1x1
conv) and replace it with ``nn.Identity`` — so resnet50 gives 2048, densenet121 1024,
vgg 4096 (fc7), squeezenet 512 (pooled), inception_v3 2048, vit the class token.

Preprocessing comes from the weights (``weights.transforms()``), never from constants in
stage code; ``--weights none`` uses the architecture's default weights' transforms.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import BackboneError, UntrustedCodeError, WeightsUnavailableError, command_hint
from . import cadene, timm_models
from .preprocessing import Preprocessing
from .taps import tap_model

HUB_PREFIX = "hub:"
# Consent to run a backbone's outside code when a file names it: True (--trust-hub), or the
# model names the user typed (--model, a job file's backbones), whose sources are then trusted.
HubTrust = bool | Collection[str]
# Used only for torch.hub entries that declare no preprocessing of their own (recorded as such).
_IMAGENET_FALLBACK = dict(resize_size=[256], crop_size=[224], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@dataclass
class Backbone:
    """A headless model ready for inference plus the facts a cache must record."""

    name: str  # as given: "resnet50" or "hub:DIR:entry"
    model: nn.Module
    embed_dim: int
    preprocessing: Preprocessing
    weights_id: str  # "torchvision:ResNet50_Weights.IMAGENET1K_V2", "none", "file:sha256=…" (content, not path)
    seed: int | None = None
    removed_layer: str = ""  # dotted name of the classification layer replaced by Identity
    weights_spec: str = "DEFAULT"  # what the user passed (a PATH is made absolute), to rebuild it later
    taps: list[LayerTap] = field(default_factory=list)  # --layer: the model returns every tap's vector side by side

    def provenance(self, tap: int | None = None) -> dict[str, Any]:
        """What a cache records; with ``tap``, of that tapped layer's columns alone (a
        backbone of one tap records it by default)."""
        prov = {
            "model": self.name,
            "weights": self.weights_id,
            "seed": self.seed,
            "embed_dim": self.embed_dim,
            "preprocessing": self.preprocessing.to_dict(),
            "removed_layer": self.removed_layer,
            "weights_spec": self.weights_spec,
        }
        if tap is None and len(self.taps) == 1:
            tap = 0
        elif tap is None and self.taps:
            prov["layers"] = [t.name for t in self.taps]
        if tap is not None:
            t = self.taps[tap]
            prov.update(embed_dim=t.dim, layer=t.name, layer_pool=t.pool)
            if t.pool not in ("avg", "flatten"):  # tokens were pooled: how, to rebuild the same backbone
                prov["token_pool"] = t.token_pool
        return prov

    def tap_columns(self, tap: int) -> slice:
        start = sum(t.dim for t in self.taps[:tap])
        return slice(start, start + self.taps[tap].dim)


@dataclass(frozen=True)
class LayerTap:
    """One tapped layer of a backbone: its name, pooled width and how it was pooled."""

    name: str
    dim: int
    pool: str
    token_pool: str = "cls"


# ----------------------------------------------------------------------------- registry


def available_models() -> list[str]:
    """Classification models in torchvision's registry."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    """``name`` as torchvision spells it (``ResNet50`` -> ``resnet50``: its registry is
    lower-case), or a BackboneError with the closest names; hub entries are kept as given."""
    if name.startswith(HUB_PREFIX) or (name.endswith((".pt", ".pth")) and Path(name).expanduser().is_file()):  # hub entry, fine-tuned model
        return name
    if name.lower().startswith(timm_models.PREFIX):
        return timm_models.check_name(name)
    if name.lower().startswith(cadene.PREFIX):
        return cadene.check_name(name)
    known = available_models()
    canonical = next((m for m in known if m == name.strip().lower()), None)
    if canonical:
        return canonical
    close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"see `{command_hint('models')}` for the list"
    raise BackboneError(f"unknown model {name!r}: {hint} (timm models: --model timm:NAME; torch.hub entries: --model hub:REPO_OR_DIR:ENTRY)")


def _weights_enum(name: str):
    return torchvision.models.get_model_weights(name)


def _resolve_torchvision_weights(name: str, spec: str):
    """Map DEFAULT / enum member name / 'Enum.MEMBER' to a torchvision WeightsEnum member."""
    enum = _weights_enum(name)
    member = spec.split(".")[-1]
    if member.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *[w.name for w in enum], "none", "PATH"])
        raise BackboneError(f"--weights {spec!r} is not a weights name of {name} (choices: {choices})") from None


def _build_pretrained(name: str, weights) -> nn.Module:
    """torchvision's own builder with ``weights`` (keeps builder quirks such as
    inception's ``transform_input``); reads the local torch hub cache, downloads when online."""
    filename = os.path.basename(weights.url)
    expected = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # URLError, OSError, hash mismatch, unpickling
        first_line = (str(exc).splitlines() or [""])[0][:120]
        raise WeightsUnavailableError(
            f"pretrained weights {type(weights).__name__}.{weights.name} are not in the local cache "
            f"({expected}) and could not be downloaded ({type(exc).__name__}: {first_line}); "
            f"go online once or copy {filename} there, or use --weights none (random init) or --weights PATH"
        ) from exc


MODEL_ARTIFACT_FORMAT = "featcache.model"  # a fine-tuned backbone + head (written by finetune)
AUX_CLASSIFIERS = ("AuxLogits", "aux1", "aux2")  # inception_v3 / googlenet training-only heads


@dataclass
class WeightsFile:
    """A state_dict read from disk, with its identity (content hash, or the recorded
    identity of a fine-tuned model) and, for fine-tuned models, their preprocessing."""

    state: dict[str, torch.Tensor]
    weights_id: str
    preprocessing: Preprocessing | None = None
    model: str | None = None  # architecture recorded in a fine-tuned model artifact


def torch_load_quietly(path: Path) -> Any:
    """``torch.load(weights_only=True)`` without its warnings about foreign pickles: a file
    that is not ours gets our one-line error, not a library warning first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_model_artifact(path: Path) -> dict[str, Any] | None:
    """The blob of a featcache fine-tuned model artifact, or None if ``path`` is another file."""
    try:
        blob = torch_load_quietly(path)
    except Exception:
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == MODEL_ARTIFACT_FORMAT else None


def _load_state_file(path: Path) -> WeightsFile:
    if not path.is_file():
        raise BackboneError(f"--weights {str(path)!r}: no such file; give DEFAULT, a weights name, none, or a state_dict file")
    try:
        state = _read_safetensors(path) if path.suffix == ".safetensors" else torch_load_quietly(path)
    except Exception as exc:
        raise BackboneError(
            f"--weights {str(path)!r} is not a loadable state_dict ({type(exc).__name__}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and state.get("format") == MODEL_ARTIFACT_FORMAT:
        info = state["backbone"]
        return WeightsFile(state["backbone_state"], info["weights_id"], Preprocessing.from_dict(info["preprocessing"]), info["model"])
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"--weights {str(path)!r} does not hold a state_dict of tensors")
    return WeightsFile({k.removeprefix("module."): v for k, v in state.items()}, f"file:sha256={file_digest(path)[:16]}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise BackboneError(f"--weights {str(path)!r} is a .safetensors file: pip install safetensors (timm's extra brings it)") from None
    return load_file(str(path))


def drop_aux_classifiers(model: nn.Module) -> None:
    """Remove inception_v3/googlenet auxiliary classifiers (used only in training mode)."""
    for attr in AUX_CLASSIFIERS:
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- headless


def find_classifier(model: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Module]:
    """The dotted name and module of the final classification layer.

    The last registered ``nn.Linear`` whose output is the class logits (or, for
    squeezenet-style models, the last 1x1 ``nn.Conv2d`` inside ``classifier``).
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if num_classes is not None:
        matching = [(n, m) for n, m in linears if m.out_features == num_classes]
        if matching:
            return matching[-1]
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential):
        convs = [(f"classifier.{n}", m) for n, m in classifier.named_modules() if isinstance(m, nn.Conv2d)]
        if convs and (num_classes is None or convs[-1][1].out_channels == num_classes):
            return convs[-1]
    if linears:
        return linears[-1]
    raise BackboneError(f"cannot find the classification layer of {type(model).__name__}; it has no nn.Linear")


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def make_headless(model: nn.Module, num_classes: int | None = None) -> str:
    """Replace the final classification layer with Identity (in place); returns its name."""
    name, layer = find_classifier(model, num_classes)
    if isinstance(layer, nn.Conv2d):  # squeezenet: conv -> ReLU -> avgpool; keep the pooled 512 input
        _set_submodule(model, name.split(".")[0], nn.Sequential(nn.AdaptiveAvgPool2d((1, 1))))
        return name.split(".")[0]
    _set_submodule(model, name, nn.Identity())
    return name


def _probe_embed_dim(model: nn.Module, size: int) -> int:
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 2:
        out = torch.flatten(out, 1)
    return int(out.shape[1])


def _strip_classifier_keys(state: dict[str, torch.Tensor], removed: str) -> dict[str, torch.Tensor]:
    prefix = removed + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], removed: str, source: str) -> None:
    state = _strip_classifier_keys(state, removed)
    if not any(k.split(".")[0] in AUX_CLASSIFIERS for k in state):
        drop_aux_classifiers(model)  # a file without auxiliary heads (they are training-only)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        example = mismatches[0] if mismatches else str(exc).splitlines()[0]
        raise BackboneError(f"{source} does not match the architecture: {len(mismatches)} shape mismatch(es), e.g. {example[:160]}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise BackboneError(f"{source} does not match the architecture: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- trust


def code_source(name: str) -> str | None:
    """Where building ``name`` takes Python code or a model definition from outside the installed
    packages, else None. ``hub:REPO_OR_DIR:ENTRY``: the repo (a local folder made absolute), whose
    hubconf.py runs on every load. ``timm:`` with a source prefix (``hf-hub:``, ``local-dir:``, any
    ``scheme:`` or path timm resolves): that source. Registry names (torchvision, ``timm:ARCH``,
    ``pretrainedmodels:ARCH``) only select code already installed, like a torchvision name: None."""
    if name.startswith(HUB_PREFIX):
        body = name[len(HUB_PREFIX):]
        repo = body.rpartition(":")[0] or body
        local = Path(repo).expanduser()
        return str(local.resolve()) if local.is_dir() else repo
    if name.lower().startswith(timm_models.PREFIX):
        arch = name[len(timm_models.PREFIX):].strip()
        return arch if (":" in arch or "/" in arch) else None
    return None


def check_artifact_backbone(name: str, artifact: str | os.PathLike, trust_hub: HubTrust = False) -> None:
    """Refuse the backbone ``name`` read from the file ``artifact`` (a head, model, checkpoint or
    cache) when building it would run outside code, unless the user consented; called before
    anything of it is imported.

    Why: an artifact is data that may come from anyone, and loading it must not run code named
    inside it. A ``hub:`` name always runs its repo's hubconf.py (torch.hub has no data-only
    load; from GitHub it is downloaded first), so it runs only when the user names that source
    themselves (``trust_hub`` holds the names typed: ``--model hub:…``, a job file's backbones)
    or passes ``--trust-hub`` (``trust_hub=True``). Registry names select installed code only;
    weights files are read with ``torch.load(weights_only=True)`` or safetensors.

    Raises:
        UntrustedCodeError: exit 5; names the file, the backbone and the fix.
    """
    source = code_source(name)
    if source is None or trust_hub is True:
        return
    typed = [trust_hub] if isinstance(trust_hub, str) else list(trust_hub or ())
    if source in {code_source(n) for n in typed}:
        return
    raise UntrustedCodeError(f"{str(artifact)!r} names the backbone {name!r}, and loading it {_what_loading_does(name, source)}; "
                             "featcache runs no code a file names without your consent: if you trust that source, rerun with --trust-hub "
                             "(trust_hub=True in Python)")


def _what_loading_does(name: str, source: str) -> str:
    if not name.startswith(HUB_PREFIX):
        return f"fetches a model from {source!r}, outside timm's installed registry"
    if Path(source).is_dir():
        return f"runs the Python code in {source!r} (its hubconf.py)"
    return f"downloads the GitHub repo {source!r} and runs its hubconf.py"


# ----------------------------------------------------------------------------- loading


def load_backbone(name: str, weights: str = "DEFAULT", seed: int = 0, device: str | torch.device = "cpu", layers: Sequence[str] = (),
                  token_pool: str = "cls", *, trust_hub: HubTrust = False) -> Backbone:
    """Build the headless backbone ``name`` with ``weights`` (DEFAULT, enum name, none, PATH);
    with ``layers``, tapped at those layers (see ``taps``) instead of its final embedding.
    ``name`` is what the user chose, so a ``hub:`` name here runs; a fine-tuned model file
    given as ``name`` names its backbone itself, which needs ``trust_hub`` (see
    ``check_artifact_backbone``).

    Raises:
        BackboneError: unknown model or weights spec, or a state_dict that does not fit.
        WeightsUnavailableError: pretrained weights asked for but not obtainable.
        UntrustedCodeError: a model file naming a ``hub:`` backbone, without consent.
    """
    if name.endswith((".pt", ".pth")) and Path(name).expanduser().is_file():  # --model FINETUNED.pt
        path = Path(name).expanduser().resolve()
        blob = read_model_artifact(path)
        if blob is None:
            raise BackboneError(f"--model {name!r} is a file but not a featcache fine-tuned model; pass a model name, or the file as --weights")
        name, weights = blob["backbone"]["model"], str(path)
        check_artifact_backbone(name, path, trust_hub)
    name = check_model_name(name)
    tapped = _tapped_artifact(weights)
    if tapped is not None:
        return _load_tapped_finetuned(name, Path(weights).expanduser().resolve(), tapped, layers, device)
    if name.startswith(HUB_PREFIX):
        backbone = _load_hub(name, weights, seed)
    elif name.startswith((timm_models.PREFIX, cadene.PREFIX)):
        backbone = _load_external(name, weights, seed)
    else:
        backbone = _load_torchvision(name, weights, seed)
    spec = str(weights)
    if Path(spec).expanduser().is_file():
        spec = str(Path(spec).expanduser().resolve())
    backbone.weights_spec = spec
    if layers:
        backbone.model, taps = tap_model(backbone.model.eval(), list(layers), token_pool, backbone.preprocessing.input_size, name)
        backbone.taps = [LayerTap(n, d, p, token_pool) for n, d, p in taps]
        backbone.embed_dim = sum(t.dim for t in backbone.taps)
    backbone.model.eval().requires_grad_(False).to(device)
    return backbone


def _load_torchvision(name: str, weights: str, seed: int) -> Backbone:
    enum = _weights_enum(name)
    spec = str(weights)
    is_path = spec.lower() not in ("none", "default") and (os.sep in spec or spec.endswith((".pt", ".pth", ".bin")) or Path(spec).is_file())
    if spec.lower() == "none" or is_path:
        torch.manual_seed(seed)
        # init_weights=True: today's default for inception/googlenet, stated so it stays fixed.
        extra = {"init_weights": True} if name in ("inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **extra)
        preprocessing = Preprocessing.from_torchvision(enum.DEFAULT.transforms())
        weights_id, used_seed = "none", seed
        num_classes = 1000
    else:
        member = _resolve_torchvision_weights(name, spec)
        num_classes = len(member.meta["categories"])
        model = _build_pretrained(name, member)
        preprocessing = Preprocessing.from_torchvision(member.transforms())
        weights_id, used_seed = f"torchvision:{type(member).__name__}.{member.name}", None
    removed = make_headless(model, num_classes)
    if is_path:
        loaded = _load_weights_file(model, spec, name, removed)
        weights_id, used_seed = loaded.weights_id, None
        preprocessing = loaded.preprocessing or preprocessing
    dim = _probe_embed_dim(model.eval(), preprocessing.input_size)
    return Backbone(name, model, dim, preprocessing, weights_id, used_seed, removed)


def _tapped_artifact(weights: str) -> dict[str, Any] | None:
    """A fine-tuned model artifact whose backbone was tapped at a layer (its state has the tapped model's keys)."""
    path = Path(str(weights)).expanduser()
    if str(weights).lower() in ("none", "default") or not path.is_file():
        return None
    blob = read_model_artifact(path)
    return blob if blob is not None and blob["backbone"].get("layer") else None


def _load_tapped_finetuned(name: str, path: Path, blob: dict[str, Any], layers: Sequence[str], device: str | torch.device) -> Backbone:
    """Rebuild the tapped architecture, then load the fine-tuned state into it as a whole."""
    info = blob["backbone"]
    if info["model"] != name:
        raise BackboneError(f"--weights {str(path)!r} is a fine-tuned {info['model']}, not {name}; pass --model {info['model']} (or --model {path})")
    if layers and list(layers) != [info["layer"]]:
        raise BackboneError(f"{str(path)!r} was fine-tuned on layer {info['layer']!r}; it cannot be tapped at {', '.join(layers)}")
    backbone = load_backbone(name, "none", layers=[info["layer"]], token_pool=info.get("token_pool") or "cls")
    result = backbone.model.load_state_dict(blob["backbone_state"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(f"{str(path)!r} does not match {name} tapped at {info['layer']}: {len(result.missing_keys)} missing, "
                            f"{len(result.unexpected_keys)} unexpected keys")
    backbone.weights_id, backbone.seed, backbone.weights_spec = info["weights_id"], None, str(path)
    backbone.preprocessing = Preprocessing.from_dict(info["preprocessing"])
    backbone.model.eval().requires_grad_(False).to(device)
    return backbone


def _load_weights_file(model: nn.Module, spec: str, name: str, removed: str) -> WeightsFile:
    """Load the state_dict file ``spec`` into ``model`` (its classifier ``removed``), strictly."""
    path = Path(spec).expanduser().resolve()
    loaded = _load_state_file(path)
    _check_artifact_model(loaded, name, path)
    _load_into(model, loaded.state, removed, f"--weights {str(path)!r}")
    return loaded


def _check_artifact_model(loaded: WeightsFile, name: str, path: Path) -> None:
    if loaded.model is not None and loaded.model != name:
        raise BackboneError(f"--weights {str(path)!r} is a fine-tuned {loaded.model}, not {name}; pass --model {loaded.model} (or --model {path})")


def parse_hub_name(name: str) -> tuple[str, str]:
    """``hub:REPO_OR_DIR:ENTRY`` (REPO may carry ``:ref``) -> (repo_or_dir, entry)."""
    body = name[len(HUB_PREFIX):]
    repo, sep, entry = body.rpartition(":")
    if not sep or not repo or not entry:
        raise BackboneError(f"--model {name!r}: torch.hub models are written hub:REPO_OR_DIR:ENTRY, e.g. hub:pytorch/vision:resnet18 or hub:./myhub:mynet")
    return repo, entry


def _hub_preprocessing(model: nn.Module) -> Preprocessing:
    declared = getattr(model, "featcache_preprocessing", None)
    if isinstance(declared, dict):
        return Preprocessing(**{**_IMAGENET_FALLBACK, **declared, "source": "hub entry"})
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:  # timm-style data config
        size = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct", 0.875))
        return Preprocessing(
            resize_size=[int(size / crop_pct)],
            crop_size=[size],
            mean=[float(x) for x in cfg.get("mean", _IMAGENET_FALLBACK["mean"])],
            std=[float(x) for x in cfg.get("std", _IMAGENET_FALLBACK["std"])],
            interpolation=str(cfg.get("interpolation", "bilinear")),
            source="hub pretrained_cfg",
        )
    return Preprocessing(**_IMAGENET_FALLBACK, source="fallback: ImageNet defaults (hub entry declares none)")


def _load_hub(name: str, weights: str, seed: int) -> Backbone:
    repo, entry = parse_hub_name(name)
    local = Path(repo).expanduser()
    source = "local" if local.is_dir() else "github"
    spec = str(weights)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"pretrained": False} if spec.lower() == "none" else {}
    try:
        model = torch.hub.load(str(local.resolve()) if source == "local" else repo, entry, source=source, trust_repo=True, **kwargs)
    except TypeError as exc:
        raise BackboneError(f"hub entry {entry!r} does not accept pretrained=False ({exc}); use --weights DEFAULT or PATH") from exc
    except Exception as exc:
        raise BackboneError(
            f"cannot load torch.hub entry {entry!r} from {repo!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "check the name, or use a local hubconf folder when offline"
        ) from exc
    if not isinstance(model, nn.Module):
        raise BackboneError(f"hub entry {entry!r} returned {type(model).__name__}, not an nn.Module")
    preprocessing = _hub_preprocessing(model)
    if hasattr(model, "reset_classifier"):  # timm models know their own head
        model.reset_classifier(0)
        removed = "reset_classifier(0)"
    else:
        removed = make_headless(model)
    weights_id = f"hub:{entry}:default" if spec.lower() == "default" else f"hub:{entry}:{spec.lower()}"
    if spec.lower() not in ("none", "default"):
        loaded = _load_weights_file(model, spec, name, removed)
        weights_id = loaded.weights_id
        preprocessing = loaded.preprocessing or preprocessing
    model.eval()
    dim = _probe_embed_dim(model, preprocessing.input_size)
    return Backbone(name, model, dim, preprocessing, weights_id, seed if spec.lower() == "none" else None, removed)


def _load_external(name: str, weights: str, seed: int) -> Backbone:
    """A ``timm:`` or ``pretrainedmodels:`` backbone: built headless by its source's module,
    then a state_dict PATH loaded into it (its classification layer's keys dropped)."""
    source = timm_models if name.startswith(timm_models.PREFIX) else cadene
    model, preprocessing, weights_id, used_seed, path_spec = source.build(name, weights, seed)
    removed = timm_models.classifier_name(model) if source is timm_models else "last_linear"
    if path_spec is not None:
        loaded = _load_weights_file(model, path_spec, name, removed)
        weights_id, used_seed = loaded.weights_id, None
        preprocessing = loaded.preprocessing or preprocessing
    dim = _probe_embed_dim(model.eval(), preprocessing.input_size)
    return Backbone(name, model, dim, preprocessing, weights_id, used_seed, removed)
