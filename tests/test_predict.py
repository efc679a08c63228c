"""predict on the one inference path (issue #29): every engine equals an independent eager
reference, predictions from a cache equal predictions from the images, a cache gains exactly
the rows it lacked, the three output formats read back equal, under torchrun too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import load_cache
from pipeline.backbones import load_backbone
from pipeline.errors import IncompatibleError, Interrupted, UsageError
from pipeline.extract import run_extract
from pipeline.heads import fit_head, load_head
from pipeline.images import load_image
from pipeline.predict import PredictOptions, predict

from conftest import ROOT, cli_json, make_image, run_cli


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """18 small noisy photos in 3 classes, one of them a broken file."""
    root = tmp_path_factory.mktemp("predict") / "photos"
    for i in range(18):
        make_image(root / f"c{i % 3}" / f"{i:02d}.jpg", size=(72, 60), seed=i)
    (root / "c1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def resnet_head(photos, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("resnet_head")
    cache = base / "r.h5"
    run_extract(photos, "resnet18", "none", cache, workers=0)
    head = Path(fit_head(cache, "logreg", base / "h.pt", plots=False, C=1.0).head_path)
    return cache, head


def _reference(head: Path, files: list[Path]) -> np.ndarray:
    """The head's probabilities computed without featcache's reader or engines: PIL decode,
    the weights' own float transforms, an eager forward, the head's predict_proba."""
    loaded = load_head(head)
    backbone = load_backbone(loaded.provenance["model"], loaded.provenance.get("weights_spec") or loaded.provenance["weights"],
                             seed=int(loaded.provenance.get("seed") or 0), layers=[loaded.provenance["layer"]] if loaded.provenance.get("layer") else [])
    transform = backbone.preprocessing.transform()
    x = torch.stack([transform(load_image(f)) for f in files])
    with torch.inference_mode():
        rows = torch.flatten(backbone.model.eval()(x), 1).numpy()
    return loaded.head.predict_proba(rows)


def _by_path(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


@pytest.mark.parametrize("model,layer,engine", [
    ("resnet18", None, "onnxruntime"),
    ("resnet18", "layer3", "openvino"),
    ("timm:test_resnet", None, "onnxruntime"),
])
def test_predict_through_an_engine_equals_an_independent_eager_reference(photos, tmp_path, model, layer, engine):
    extract_opts = {"workers": 0, **({"layers": (layer,)} if layer else {})}
    run_extract(photos, model, "none", tmp_path / "c.h5", **extract_opts)
    cache = next(tmp_path.glob("c*.h5"))
    head = Path(fit_head(cache, "logreg", tmp_path / "h.pt", plots=False, C=1.0).head_path)
    r = predict(head, [photos], PredictOptions(engine=engine, workers=0, topk=3))
    assert r.engine == engine and r.n == 18 and [p for p, _ in r.failures] == [str(photos / "c1" / "broken.jpg")]
    files = sorted(photos.rglob("[0-9]*.jpg"))
    want = _reference(head, files)
    classes = list(load_head(head).provenance["classes"])
    got = _by_path(r.rows)
    for f, p in zip(files, want):
        row = got[str(f)]
        assert row["predicted"] == classes[int(p.argmax())]
        np.testing.assert_allclose([t["probability"] for t in row["topk"]], np.sort(p)[::-1][:3], rtol=1e-4, atol=1e-6)


def test_predict_from_the_cache_equals_predict_from_the_images(photos, resnet_head, tmp_path):
    cache, head = resnet_head
    images = predict(head, [photos], workers=0)
    rows = predict(head, options={"cache": str(cache)})
    assert rows.source == "cache" and rows.n == images.n == 18 and rows.known == images.known == 18
    from_cache = {str(photos / r["path"]): r for r in rows.rows}
    for path, r in _by_path(images.rows).items():
        c = from_cache[path]
        assert c["predicted"] == r["predicted"] and c["true"] == r["true"]
        np.testing.assert_allclose([t["probability"] for t in c["topk"]], [t["probability"] for t in r["topk"]], rtol=1e-5, atol=1e-7)
    with pytest.raises(UsageError, match="no train rows"):  # the folder is not pre-split
        predict(head, options={"cache": str(cache), "split": "train"})


def test_a_cache_gains_exactly_the_rows_it_lacked_then_every_image_is_scored(photos, tmp_path, resnet_head):
    _, head = resnet_head
    half = tmp_path / "photos"
    import shutil

    shutil.copytree(photos, half)
    later = sorted(half.rglob("1*.jpg"))
    held = {f: f.read_bytes() for f in later}
    for f in later:
        f.unlink()
    cache = tmp_path / "grow.h5"
    run_extract(half, "resnet18", "none", cache, workers=0)
    before = load_cache(cache)
    for f, data in held.items():
        f.write_bytes(data)
    out = cli_json("predict", str(head), str(half), "--cache", str(cache), "--out", str(tmp_path / "p.jsonl"), "--workers", "0", expect=3)
    after = load_cache(cache)
    assert out["extracted"] == len(later) and out["source"] == "images+cache" and out["n"] == 18
    assert set(after.paths) - set(before.paths) == {str(f.relative_to(half)) for f in later}
    kept = {p: e for p, e in zip(after.paths, after.embeddings)}
    for p, e in zip(before.paths, before.embeddings):
        assert kept[p].tobytes() == e.tobytes()  # rows already there were not recomputed
    reference = load_cache(resnet_head[0])
    ref = {p: e for p, e in zip(reference.paths, reference.embeddings)}
    for f in later:
        np.testing.assert_allclose(kept[str(f.relative_to(half))], ref[str(f.relative_to(half))], rtol=1e-4, atol=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and {r["path"] for r in lines} == set(after.paths)


def test_a_cache_of_another_backbone_is_refused(photos, resnet_head, tmp_path):
    _, head = resnet_head
    other = tmp_path / "seed1.h5"
    run_extract(photos, "resnet18", "none", other, workers=0, seed=1)
    with pytest.raises(IncompatibleError, match="seed 1"):
        predict(head, options={"cache": str(other)})
    proc = run_cli("predict", str(head), "--cache", str(other))
    assert proc.returncode == 5 and "seed" in proc.stderr and "Traceback" not in proc.stderr


def test_the_three_output_formats_read_back_equal(photos, resnet_head, tmp_path):
    cache, head = resnet_head
    outs = {fmt: tmp_path / f"p.{fmt}" for fmt in ("csv", "jsonl", "parquet")}
    for fmt, path in outs.items():
        extra = ["--with-embeddings"] if fmt == "parquet" else []
        proc = run_cli("predict", str(head), str(photos), "--out", str(path), "--topk", "2", "--workers", "0", *extra)
        assert proc.returncode == 3 and "broken.jpg" in proc.stderr, proc.stderr
    csv_, jsonl, parquet = pd.read_csv(outs["csv"], keep_default_na=False), pd.read_json(outs["jsonl"], lines=True), pd.read_parquet(outs["parquet"])
    assert len(csv_) == len(jsonl) == len(parquet) == 18
    assert list(csv_.path) == list(jsonl.path) == list(parquet.path)
    assert list(csv_.predicted) == list(jsonl.predicted) == list(parquet.predicted)
    assert list(csv_.true) == list(jsonl.true) == list(parquet.true) and set(parquet.true) == {"c0", "c1", "c2"}
    np.testing.assert_allclose(csv_.probability, jsonl.probability, rtol=1e-5)
    np.testing.assert_allclose(parquet.probability, jsonl.probability, rtol=1e-6)
    assert [c.split(":")[0] for cell in csv_.topk for c in cell.split(";")] == [t["class"] for ks in jsonl.topk for t in ks]
    assert [list(c) for c in parquet.topk_classes] == [[t["class"] for t in ks] for ks in jsonl.topk]
    c = load_cache(cache)
    emb = {str(photos / p): e for p, e in zip(c.paths, c.embeddings)}
    for path, e in zip(parquet.path, parquet.embedding):
        np.testing.assert_allclose(np.asarray(e, np.float32), emb[path], rtol=1e-4, atol=1e-5)


def test_a_bad_output_suffix_and_an_interrupt_write_nothing(photos, resnet_head, tmp_path):
    _, head = resnet_head
    proc = run_cli("predict", str(head), str(photos), "--out", str(tmp_path / "p.txt"))
    assert proc.returncode == 2 and ".csv, .jsonl or .parquet" in proc.stderr
    out = tmp_path / "p.csv"

    def ctrl_c(done, total, elapsed):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="nothing was written"):
        predict(head, [photos], PredictOptions(out=str(out), workers=0, batch_size=4), progress=ctrl_c)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_two_torchrun_ranks_write_one_file_in_input_order(photos, resnet_head, tmp_path):
    _, head = resnet_head
    one = tmp_path / "one.csv"
    assert run_cli("predict", str(head), str(photos), "--out", str(one), "--workers", "0").returncode == 3
    two = tmp_path / "two.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "cli.py"), "predict",
                           str(head), str(photos), "--out", str(two), "--workers", "0", "--json"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr  # the ranks exit 3 (a broken file), which torchrun reports as its own 1
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])
    assert summary["n"] == 18 and [f["path"] for f in summary["failures"]] == [str(photos / "c1" / "broken.jpg")]
    a, b = pd.read_csv(one), pd.read_csv(two)
    assert list(a.path) == list(b.path) and list(a.predicted) == list(b.predicted)
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if ".rank" in p.name]
