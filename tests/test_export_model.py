"""export-model: one ONNX graph from images to probabilities, equal to predict's numbers.

The reference is ``predict_images`` itself (the eager backbone, then the head's own
``predict_proba``), run on real images (scikit-learn's digits written as PNG files); the
exported model runs in ONNX Runtime on the same files, decoded as extraction decodes them.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_json, run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4


def digit_files(head: Path, n: int) -> list[Path]:
    """``n`` images of the head's data root, spread over its classes."""
    from pipeline.heads import load_head

    root = Path(load_head(head).provenance["data_root"])
    files = sorted(root.rglob("*.png"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def predict_proba_rows(head: Path, files: list[Path]) -> tuple[list[str], np.ndarray]:
    """(classes, [N, C]) as ``predict`` computes them: its top-k over every class."""
    from pipeline.heads import load_head
    from pipeline.predict import predict_images

    classes = list(load_head(head).provenance["classes"])
    rows = predict_images(head, files, topk=len(classes), workers=0, trust_hub=True).rows
    assert [Path(r["path"]).name for r in rows] == [f.name for f in files]
    return classes, np.array([[{t["class"]: t["probability"] for t in r["topk"]}[c] for c in classes] for r in rows])


def onnx_proba(model: Path, files: list[Path]) -> np.ndarray:
    """The file run by ONNX Runtime directly, fed as its metadata says."""
    import onnxruntime as ort

    from pipeline.backbones import Preprocessing
    from pipeline.images import load_image

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["preprocessing"])
    p = Preprocessing(**{k: pre[k] for k in ("resize_size", "crop_size", "mean", "std", "interpolation", "antialias", "source", "input_space", "input_range")})
    pixels = torch.stack([p.pixels()(load_image(f)) for f in files])
    x = pixels.numpy() if pre["input"] == "uint8" else p.normalize(pixels).numpy()
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def tiny_cache(tiny_head) -> Path:
    return tiny_head.parent / "tiny.h5"


def fit(cache: Path, kind: str, out: Path, **fields) -> Path:
    from pipeline.heads.fit import fit_head

    return Path(fit_head(cache, kind, out, plots=False, **fields).head_path)


@pytest.mark.parametrize("uint8", [False, True])
def test_logreg_export_equals_predict_and_metadata_round_trips(tiny_head, tmp_path, uint8):
    import onnx

    from pipeline.heads import load_head
    from pipeline.serving import export_model, load_classifier

    out = tmp_path / "m.onnx"
    r = export_model(tiny_head, out, uint8=uint8, trust_hub=True)
    assert r.path == str(out) and out.stat().st_size == r.bytes and r.max_abs_diff <= TOL and r.top1_agree == 1.0
    files = digit_files(tiny_head, 6)
    classes, expected = predict_proba_rows(tiny_head, files)
    for batch in (files[:1], files[1:]):  # batch 1 and 5: the batch axis is free
        got = onnx_proba(out, batch)
        assert got.shape == (len(batch), len(classes))
        np.testing.assert_allclose(got, expected[[files.index(f) for f in batch]], atol=TOL, rtol=0)
    # the input is what the metadata says
    model = onnx.load(str(out))
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == (onnx.TensorProto.UINT8 if uint8 else onnx.TensorProto.FLOAT)
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    # metadata round trip: what the head file knows, read back from the ONNX file
    props = {p.key: p.value for p in model.metadata_props}
    head = load_head(tiny_head)
    prov = head.provenance
    assert json.loads(props["classes"]) == list(prov["classes"])
    pre = json.loads(props["preprocessing"])
    assert pre["input"] == ("uint8" if uint8 else "float")
    assert {k: pre[k] for k in ("resize_size", "crop_size", "mean", "std", "interpolation")} == {
        "resize_size": [36], "crop_size": [32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    meta = json.loads(props["provenance"])
    for key in ("model", "weights", "seed", "cache_fingerprint", "data_root", "embed_dim"):
        assert meta[key] == prov[key], key
    assert meta["head_kind"] == "logreg" and meta["exported"]["check"]["max_abs_diff"] == r.max_abs_diff
    from pipeline import __version__

    assert props["featcache_version"] == __version__
    # and through the shared classifier interface
    c = load_classifier(out)
    assert c.classes == list(prov["classes"]) and c.metadata()["provenance"]["artifact_sha256"] == meta["artifact_sha256"]
    px = torch.stack([c.pixels(f.read_bytes()) for f in files])
    np.testing.assert_allclose(c.probabilities(px), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp", "knn"])
def test_every_head_kind_exports(tiny_cache, tiny_head, tmp_path, kind):
    from pipeline.serving import export_model

    fields = {"epochs": 8} if kind in ("linear", "mlp") else {"k": 5}
    head = fit(tiny_cache, kind, tmp_path / f"h.{kind}.head.pt", **fields)
    out = tmp_path / f"{kind}.onnx"
    export_model(head, out, uint8=True, trust_hub=True)
    files = digit_files(tiny_head, 5)
    _, expected = predict_proba_rows(head, files)
    np.testing.assert_allclose(onnx_proba(out, files), expected, atol=TOL, rtol=0)


def test_knn_whose_rows_stay_in_the_cache_exports(tiny_cache, tiny_head, tmp_path):
    """A streamed kNN head keeps only paths and hashes; the export reads its rows from the cache."""
    from pipeline.heads import load_head
    from pipeline.serving import export_model

    head = fit(tiny_cache, "knn", tmp_path / "h.knn.head.pt", k=5, stream=True)
    assert load_head(head).head.train_ is None  # the rows really stay in the cache
    out = tmp_path / "knn.onnx"
    export_model(head, out, uint8=True, trust_hub=True)
    files = digit_files(tiny_head, 5)
    _, expected = predict_proba_rows(head, files)
    np.testing.assert_allclose(onnx_proba(out, files), expected, atol=TOL, rtol=0)


def test_fine_tuned_model_exports_as_trained(tiny_head, tmp_path):
    from pipeline.finetune import run_finetune
    from pipeline.serving import export_model

    model = Path(run_finetune(tiny_head, tmp_path / "ft.pt", options={"epochs": 2, "head": "new", "batch_size": 8, "augment": "light"}, workers=0, plots=False,
                              trust_hub=True).model_path)
    out = tmp_path / "ft.onnx"
    r = export_model(model, out, trust_hub=True)
    assert r.metadata["provenance"]["weights"].startswith("finetuned:sha256=") and r.metadata["provenance"]["artifact_kind"] == "fine-tuned model"
    files = digit_files(tiny_head, 5)
    _, expected = predict_proba_rows(model, files)
    _, probe = predict_proba_rows(tiny_head, files)
    assert np.abs(expected - probe).max() > 1e-3  # the fine-tune changed the numbers: the export must follow the model, not the probe
    np.testing.assert_allclose(onnx_proba(out, files), expected, atol=TOL, rtol=0)


def test_normalisation_in_the_graph_matches_preprocessing_for_bgr_0_255():
    """The in-graph normalisation of a pretrainedmodels-style backbone (BGR, 0-255) equals
    ``Preprocessing.normalize``, exported and run in ONNX Runtime."""
    import onnxruntime as ort

    from pipeline.backbones import Preprocessing
    from pipeline.serving.export import Normalize

    pre = Preprocessing([36], [32], [104.0, 117.0, 128.0], [1.0, 1.0, 1.0], input_space="BGR", input_range=255.0)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    program = torch.onnx.export(Normalize(pre).eval(), (pixels[:2],), dynamo=True, opset_version=18, input_names=["pixels"],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels.numpy()})[0]
    np.testing.assert_allclose(got, pre.normalize(pixels).numpy(), atol=1e-4, rtol=0)
    assert not np.allclose(got, Preprocessing([36], [32], [104.0, 117.0, 128.0], [1.0, 1.0, 1.0], input_range=255.0).normalize(pixels).numpy())


def test_an_export_that_differs_is_not_written(tiny_head, tmp_path, monkeypatch):
    from pipeline.errors import ExitCode
    from pipeline.serving import ExportError, export, export_model

    real = export.logreg_module

    def off_by_a_little(head):
        module = real(head)
        module.bias[0] += 0.05  # a wrong fold: one class's logit moves, the probabilities by more than 1e-4
        return module

    monkeypatch.setattr(export, "logreg_module", off_by_a_little)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(ExportError) as info:
        export_model(tiny_head, out, trust_hub=True)
    assert info.value.exit_code == ExitCode.INTERNAL == 1
    message = str(info.value)
    assert "\n" not in message and "max |Δp| = " in message and "was not written" in message
    assert float(re.search(r"max \|Δp\| = ([0-9.e-]+)", message).group(1)) > TOL
    assert out.read_bytes() == b"the previous export"
    assert not [p for p in tmp_path.iterdir() if p.name != "m.onnx"]  # no temporary left behind


def test_knn_too_large_for_a_graph_is_refused(tiny_cache, tmp_path, monkeypatch):
    from pipeline.errors import UsageError
    from pipeline.serving import export, export_model

    head = fit(tiny_cache, "knn", tmp_path / "h.knn.head.pt", k=5)
    monkeypatch.setattr(export, "KNN_MAX_BYTES", 1000)  # fewer bytes than its training rows (tens of them, 32 wide, float32)
    with pytest.raises(UsageError, match=r"holds [0-9,]+ training rows x 32 \(0 MiB\), over the 0 MiB an exported graph may hold; serve the head file"):
        export_model(head, tmp_path / "k.onnx", trust_hub=True)
    assert not (tmp_path / "k.onnx").exists()


def test_probe_images_are_required_when_the_data_root_is_gone(tiny_head, tmp_path):
    from pipeline.backbones import Preprocessing
    from pipeline.errors import UsageError
    from pipeline.serving.export import probe_pixels

    pre = Preprocessing([36], [32], [0.5] * 3, [0.5] * 3)
    for root in (str(tmp_path / "gone"), None):
        with pytest.raises(UsageError, match="pass --probe FOLDER_OR_FILES"):
            probe_pixels([], root, pre, 4)
    folder = Path(digit_files(tiny_head, 1)[0]).parent
    names, pixels = probe_pixels([str(folder)], None, pre, 3)  # a folder given as --probe
    assert len(names) == 3 and pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.uint8


def test_hub_backbone_needs_consent(tiny_head, tmp_path):
    from pipeline.errors import UntrustedCodeError
    from pipeline.serving import export_model

    with pytest.raises(UntrustedCodeError, match="--trust-hub"):
        export_model(tiny_head, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_every_export_option_is_a_flag_of_export_model():
    import dataclasses

    import typer

    from cli import app
    from pipeline.serving import ExportOptions

    flags = {opt for p in typer.main.get_command(app).commands["export-model"].params for opt in p.opts}
    for f in dataclasses.fields(ExportOptions):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- onnx-snippet[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "the README's ONNX Runtime snippet is gone"
    return match.group(1)


def test_cli_export_status_and_the_readme_snippet(tiny_head, tmp_path):
    """The command writes the file, `status` shows its metadata (and refuses a changed
    byte), and the README's ~15 lines serve it without featcache or torch, giving predict's
    numbers."""
    out = tmp_path / "model.onnx"
    r = cli_json("export-model", str(tiny_head), "--uint8", "--out", str(out), "--trust-hub", "--probe-images", "4")
    assert r["path"] == str(out) and r["input_kind"] == "uint8" and len(r["probe_images"]) == 4 and r["max_abs_diff"] <= TOL
    text = run_cli("status", str(out))
    assert text.returncode == 0 and "input=uint8" in text.stdout and "integrity ok" in text.stdout, text.stderr
    assert "logreg" in text.stdout and ", ".join(r["classes"][:3]) in text.stdout
    from pipeline.status import onnx_status

    s = onnx_status(out)  # what `status --json` prints
    assert s["classes"] == r["classes"] and s["preprocessing"]["input"] == "uint8" and s["integrity"] == "ok"
    assert s["provenance"]["head_kind"] == "logreg" and s["inputs"][0]["shape"] == ["batch", 3, 32, 32]

    snippet = tmp_path / "serve_onnx.py"
    snippet.write_text(readme_snippet())
    blocker = "import sys\nfor name in ('torch', 'pipeline', 'torchvision'):\n    sys.modules[name] = None  # importing them fails\n"
    files = digit_files(tiny_head, 5)
    proc = subprocess.run([sys.executable, "-c", blocker + f"sys.argv = ['serve_onnx.py'] + sys.argv[1:]\nexec(open({str(snippet)!r}).read())",
                           *map(str, files)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line.rsplit(" ", 2) for line in proc.stdout.splitlines()]
    classes, expected = predict_proba_rows(tiny_head, files)
    assert [Path(p).name for p, _, _ in lines] == [f.name for f in files]
    assert [c for _, c, _ in lines] == [classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([float(p) for _, _, p in lines], expected.max(1), atol=TOL, rtol=0)

    # one changed byte inside the weights: refused (exit 5), never served
    import onnx

    data = bytearray(out.read_bytes())
    weights = max(onnx.load(str(out)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data[data.find(weights) + len(weights) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    from pipeline.errors import CacheError
    from pipeline.serving import load_classifier

    with pytest.raises(CacheError, match="not what export-model wrote") as info:
        load_classifier(out)
    assert info.value.exit_code == 5
    assert onnx_status(out, verify=False)["integrity"] == "not checked"
