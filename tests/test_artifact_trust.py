"""Artifacts carry data, not code (issue #28, item 4).

A head, fine-tuned model or checkpoint names its backbone. ``hub:REPO_OR_DIR:ENTRY`` names
run that repo's hubconf.py, so a backbone named by a file is refused (exit 5) before any of
it is imported, unless the user consents: ``--trust-hub`` (``trust_hub=True``) or naming the
same source themselves. The hub folder here writes a marker file whenever its hubconf.py
runs, so each test can tell whether the code ran.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.errors import ExitCode, UntrustedCodeError

from tiny_backbone import TINY_BN_HUBCONF

# Appends a line to ran.txt beside hubconf.py each time torch.hub imports it.
MARKING_HUBCONF = '''
import os as _os
with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "ran.txt"), "a") as _fh:
    _fh.write("hubconf.py ran\\n")
''' + TINY_BN_HUBCONF


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """A head and a fine-tuned model (with its checkpoint) on the marking hub entry; made with consent."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.finetune import run_finetune
    from pipeline.heads.fit import fit_head

    base = tmp_path_factory.mktemp("trust")
    hub_dir = base / "markhub"
    hub_dir.mkdir()
    (hub_dir / "hubconf.py").write_text(MARKING_HUBCONF)
    hub = f"hub:{hub_dir}:tinybn"
    data = write_digits(base / "digits", size=32, per_class=4)
    run_extract(data, hub, "none", base / "c.h5", batch_size=64, workers=0)  # typed by the user: consent
    head = Path(fit_head(base / "c.h5", "logreg", base / "h.head.pt", plots=False).head_path)
    model = base / "ft.pt"
    run_finetune(head, model, options={"epochs": 1, "batch_size": 8, "augment": "light"}, workers=0, plots=False, trust_hub=True)
    return SimpleNamespace(hub=hub, hub_dir=hub_dir, marker=hub_dir / "ran.txt", data=data, head=head, model=model, base=base)


@pytest.fixture
def art(made) -> SimpleNamespace:
    """The artifacts, with the marker cleared: it exists afterwards only if hubconf.py ran."""
    made.marker.unlink(missing_ok=True)
    return made


def _invoke(*args: str) -> tuple[int, dict]:
    """The CLI in-process with --json: (exit code, its one JSON object)."""
    result = CliRunner().invoke(app, [*args, "--json"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.output
    return result.exit_code, json.loads(lines[0])


def _assert_refused(message: str, artifact: Path, hub: str) -> None:
    assert "\n" not in message and str(artifact) in message and hub in message and "--trust-hub" in message, message


# ----------------------------------------------------------------------------- predict


def test_predict_refuses_a_hub_backbone_named_by_a_head_before_its_code_runs(art):
    code, out = _invoke("predict", str(art.head), str(art.data / "digit_1"))
    assert code == ExitCode.INCOMPATIBLE == out["exit_code"] and out["error_type"] == "UntrustedCodeError"
    _assert_refused(out["error"], art.head, art.hub)
    assert not art.marker.exists(), "hubconf.py ran before the refusal"


def test_predict_runs_the_hub_entry_with_trust_hub(art):
    code, out = _invoke("predict", str(art.head), str(art.data / "digit_1"), "--trust-hub")
    assert code == 0 and len(out["predictions"]) == 4
    assert art.marker.exists()


def test_library_consent_is_true_or_the_same_source_by_name(art):
    from pipeline.predict import predict_images

    with pytest.raises(UntrustedCodeError) as refused:
        predict_images(art.head, [art.data / "digit_2"], trust_hub=[f"hub:{art.base / 'elsewhere'}:tinybn", "resnet18"])
    _assert_refused(str(refused.value), art.head, art.hub)
    assert refused.value.exit_code == ExitCode.INCOMPATIBLE and not art.marker.exists()
    same = f"hub:{os.path.relpath(art.hub_dir)}:other_entry"  # the same repo, spelled another way: its hubconf.py is what runs
    assert len(predict_images(art.head, [art.data / "digit_2"], trust_hub=[same]).rows) == 4
    assert art.marker.exists()


def test_a_fine_tuned_model_file_is_refused_the_same_way(art):
    code, out = _invoke("predict", str(art.model), str(art.data / "digit_1"))
    assert code == ExitCode.INCOMPATIBLE and not art.marker.exists()
    _assert_refused(out["error"], art.model, art.hub)


# ----------------------------------------------------------------------------- finetune


def test_finetune_from_a_head_and_its_resume_are_refused_without_consent(art):
    from pipeline.finetune import run_finetune

    with pytest.raises(UntrustedCodeError) as fresh:
        run_finetune(art.head, art.base / "new.pt", options={"epochs": 0}, workers=0, plots=False)
    _assert_refused(str(fresh.value), art.head, art.hub)
    code, out = _invoke("finetune", str(art.head), "--out", str(art.model), "--resume", "--epochs", "2", "--workers", "0")
    assert code == ExitCode.INCOMPATIBLE and out["error_type"] == "UntrustedCodeError"
    assert not art.marker.exists()
    assert not (art.base / "new.pt").exists() and torch.load(art.model.with_suffix(".ckpt"), weights_only=True)["epoch"] == 1


def test_finetune_with_trust_hub_runs(art):
    code, out = _invoke("finetune", str(art.head), "--out", str(art.base / "zero.pt"), "--epochs", "0", "--workers", "0", "--trust-hub")
    assert code == 0 and Path(out["model_path"]).is_file() and art.marker.exists()


# ----------------------------------------------------------------------------- extract --model FILE


def test_extract_with_a_model_file_needs_consent_or_the_hub_name_typed(art):
    cache = art.base / "again.h5"
    code, out = _invoke("extract", str(art.data), "--model", str(art.model), "--out", str(cache), "--workers", "0")
    assert code == ExitCode.INCOMPATIBLE and not cache.exists() and not art.marker.exists()
    _assert_refused(out["error"], art.model, art.hub)
    code, out = _invoke("extract", str(art.data), "--model", art.hub, "--weights", str(art.model), "--out", str(cache), "--workers", "0")
    assert code == 0 and out["weights"].startswith("finetuned:sha256=") and art.marker.exists()  # the user named the source
    art.marker.unlink()
    code, out = _invoke("extract", str(art.data), "--model", str(art.model), "--out", str(art.base / "third.h5"), "--workers", "0", "--trust-hub")
    assert code == 0 and art.marker.exists()


# ----------------------------------------------------------------------------- timm sources, registry names


def _head_naming(art, model: str) -> Path:
    blob = torch.load(art.head, weights_only=True)
    blob["provenance"]["model"] = model
    path = art.base / f"names-{model.replace(':', '_').replace('/', '_')}.pt"
    torch.save(blob, path)
    return path


def test_a_timm_name_that_fetches_from_outside_its_registry_is_refused(art, monkeypatch):
    from pipeline.errors import BackboneError
    from pipeline.heads import load_head

    name = "timm:hf-hub:someone/model"
    head = _head_naming(art, name)
    with pytest.raises(UntrustedCodeError) as refused:
        load_head(head).load_backbone()
    _assert_refused(str(refused.value), head, name)
    pytest.importorskip("timm")
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **k: pytest.fail("must not go online"))
    with pytest.raises(BackboneError, match="outside timm's installed registry"):  # even with consent: only registry names are built
        load_head(head).load_backbone(trust_hub=True)


@pytest.mark.parametrize("name, source", [
    ("resnet18", None), ("timm:resnet18", None), ("timm:resnet18.a1_in1k", None), ("pretrainedmodels:se_resnet50", None),
    ("timm:hf-hub:timm/resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"), ("timm:local-dir:/models/x", "local-dir:/models/x"),
    ("hub:pytorch/vision:resnet18", "pytorch/vision"), ("hub:pytorch/vision:v0.10.0:resnet18", "pytorch/vision:v0.10.0"),
])
def test_only_names_that_reach_outside_the_installed_packages_need_consent(name, source):
    from pipeline.backbones import code_source

    assert code_source(name) == source


# ----------------------------------------------------------------------------- weights_only


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("use", ["head", "checkpoint", "model", "weights"])
def test_no_artifact_is_unpickled(tmp_path, use):
    """A file whose pickle would run code on load is refused as not ours; the code never runs."""
    from pipeline.backbones import load_backbone
    from pipeline.errors import FeatcacheError
    from pipeline.finetune.run import load_checkpoint
    from pipeline.heads import load_head

    marker, evil = tmp_path / "pwned.txt", tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "featcache.head", "x": _Payload(marker)}, fh)
    torch.save({"format": "featcache.head", "x": _Payload(marker)}, tmp_path / "evil_zip.pt")
    loaders = {"head": load_head, "checkpoint": load_checkpoint, "model": lambda p: load_backbone(str(p)),
               "weights": lambda p: load_backbone("resnet18", str(p))}
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(FeatcacheError):
            loaders[use](Path(path))
    assert not marker.exists()
