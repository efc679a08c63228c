"""Hugging Face datasets on disk (save_to_disk folders, Hub-style Parquet) as a source, read
with pyarrow alone: rows, classes, splits and pixels as written."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import load_cache
from pipeline.backbones import load_backbone
from pipeline.errors import DataError
from pipeline.extract import run_extract

from conftest import run_cli

pa = pytest.importorskip("pyarrow", reason="the hf extra (pyarrow) is not installed")
import pyarrow.parquet as pq  # noqa: E402

FEATURES = {"image": {"_type": "Image"}, "label": {"names": ["ant", "bee"], "_type": "ClassLabel"}}


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _table(n: int, seed: int):
    return pa.table({"image": [{"bytes": _png(seed + i), "path": None} for i in range(n)], "label": [i % 2 for i in range(n)]})


def save_to_disk_layout(root, splits=(("train", 5), ("test", 3))):
    """The files DatasetDict.save_to_disk writes: Arrow streams, dataset_info.json, dataset_dict.json."""
    for k, (split, n) in enumerate(splits):
        (root / split).mkdir(parents=True)
        table = _table(n, 100 * k)
        with pa.ipc.new_stream(str(root / split / "data-00000-of-00001.arrow"), table.schema) as w:
            w.write_table(table)
        (root / split / "dataset_info.json").write_text(json.dumps({"features": FEATURES}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": [s for s, _ in splits]}))
    return root


def test_save_to_disk_dataset_rows_equal_the_written_images(tmp_path, tiny_hub):
    root = save_to_disk_layout(tmp_path / "ds")
    s = run_extract(f"hf:{root}", tiny_hub, "none", tmp_path / "c.h5", workers=2)
    assert s.new == 8 and s.classes == ["ant", "bee"]
    c = load_cache(tmp_path / "c.h5")
    assert sorted(set(c.split)) == ["test", "train"] and c.meta["layout"] == "hf"
    row = list(c.paths).index("test/0000002")
    bb = load_backbone(tiny_hub, "none")
    with torch.no_grad():
        want = bb.model(bb.preprocessing.transform()(Image.open(io.BytesIO(_png(102))).convert("RGB"))[None]).numpy()[0]
    np.testing.assert_allclose(c.embeddings[row], want, rtol=1e-5, atol=1e-6)
    assert c.labels[row] == 0
    assert run_extract(f"hf:{root}", tiny_hub, "none", tmp_path / "c.h5", workers=0).new == 0


def test_hub_parquet_with_several_row_groups(tmp_path, tiny_hub):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    table = _table(7, 0).replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode()})
    pq.write_table(table, tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet", row_group_size=3)
    s = run_extract(f"hf:{tmp_path / 'pq'}", tiny_hub, "none", tmp_path / "c.h5", workers=0)
    c = load_cache(tmp_path / "c.h5")
    assert s.new == 7 and set(c.split) == {"val"} and list(c.labels) == [i % 2 for i in range(7)]
    by_path = dict(zip(c.paths, c.embeddings))
    single = run_extract(f"hf:{tmp_path / 'pq' / 'data' / 'validation-00000-of-00001.parquet'}", tiny_hub, "none", tmp_path / "d.h5", workers=0)
    assert single.new == 7
    d = load_cache(tmp_path / "d.h5")
    for p, e in zip(d.paths, d.embeddings):  # row 5 lives in the second row group
        np.testing.assert_array_equal(by_path[p], e)


def test_bad_hf_sources_are_one_line(tmp_path, tiny_hub, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    p = run_cli("extract", f"hf:{tmp_path / 't.parquet'}", "-m", tiny_hub, "-w", "none", "--out", str(tmp_path / "c.h5"))
    assert p.returncode == 2 and "has no image column" in p.stderr
    from pipeline.images.hf import scan_hf

    with pytest.raises(DataError, match="does not exist"):
        scan_hf(f"hf:{tmp_path / 'nope'}")
    monkeypatch.setitem(sys.modules, "pyarrow", None)

    with pytest.raises(DataError, match=r"pip install -e '\.\[hf\]'"):
        scan_hf(f"hf:{tmp_path / 't.parquet'}")
