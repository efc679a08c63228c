"""Manifests as inputs: a CSV, TSV, JSON-lines or Parquet list of images gives the same
cache rows as the folder it describes, skips bad rows with their row number, and is
incremental like a folder."""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.errors import DataError
from pipeline.extract import run_extract
from pipeline.images import scan_folder, scan_manifest

from conftest import cli_json, make_image, run_cli


def _tree(root):
    """ImageFolder tree: 2 classes x 3 images."""
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            make_image(root / cls / f"{i}.png", size=(40, 36), seed=10 * c + i)
    return root


def _write(path, rows, fmt):
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_folder_and_manifest_give_the_same_cache(tmp_path, fmt, tiny_hub):
    root = _tree(tmp_path / "imgs")
    folder = scan_folder(root)
    rows = [{"path": r.relpath, "label": folder.classes[r.label]} for r in reversed(folder.records)]  # another order on purpose
    manifest = _write(root / f"list.{fmt}", rows, fmt)
    a = run_extract(root, tiny_hub, "none", tmp_path / "folder.h5", workers=0)
    b = run_extract(manifest, tiny_hub, "none", tmp_path / "manifest.h5", workers=0)
    assert a.new == b.new == 6 and a.classes == b.classes == ["cat", "dog"]
    fa, fb = load_cache(tmp_path / "folder.h5"), load_cache(tmp_path / "manifest.h5")
    ia, ib = np.argsort(fa.paths), np.argsort(fb.paths)
    assert list(fa.paths[ia]) == list(fb.paths[ib]) and list(fa.labels[ia]) == list(fb.labels[ib])
    np.testing.assert_array_equal(fa.embeddings[ia], fb.embeddings[ib])
    assert fb.meta["layout"] == "manifest" and fb.meta["data_root"] == str(manifest.resolve())
    assert fb.meta["manifest_columns"] == {"path": "path", "label": "label", "split": "split"}


def test_manifest_columns_splits_absolute_paths_and_bad_rows(tmp_path, tiny_hub):
    _tree(tmp_path / "imgs")
    elsewhere = make_image(tmp_path / "other" / "x.png", seed=99)
    rows = [
        {"file": "cat/0.png", "cls": "cat", "part": "train"},
        {"file": "cat/1.png", "cls": "cat", "part": "Validation"},
        {"file": "dog/0.png", "cls": "dog", "part": "test"},
        {"file": str(elsewhere), "cls": "dog", "part": "train"},
        {"file": "dog/missing.png", "cls": "dog", "part": "train"},   # row 6: does not exist
        {"file": "dog/1.png", "cls": "", "part": "train"},            # row 7: empty label
        {"file": "dog/2.png", "cls": "dog", "part": "holdout"},       # row 8: unknown split
        {"file": "cat/0.png", "cls": "cat", "part": "train"},         # row 9: listed again
    ]
    manifest = _write(tmp_path / "imgs" / "m.csv", rows, "csv")
    out = cli_json("extract", str(manifest), "-m", tiny_hub, "-w", "none", "--workers", "0", "--out", str(tmp_path / "c.h5"),
                   "--path-col", "file", "--label-col", "cls", "--split-col", "part")
    assert out["new"] == 4 and out["classes"] == ["cat", "dog"]
    reasons = {s["path"]: s["reason"] for s in out["skipped"]}
    assert reasons == {"dog/missing.png": "m.csv row 6: no such file or directory", "dog/1.png": "m.csv row 7: empty 'cls'",
                       "dog/2.png": "m.csv row 8: split 'holdout' is not train, val or test", "cat/0.png": "m.csv row 9: listed again (first listing kept)"}
    c = load_cache(tmp_path / "c.h5")
    got = dict(zip(c.paths, zip(c.split, (c.classes[i] for i in c.labels))))
    assert got == {"cat/0.png": ("train", "cat"), "cat/1.png": ("val", "cat"), "dog/0.png": ("test", "dog"), str(elsewhere): ("train", "dog")}


def test_manifest_is_incremental_and_follows_its_rows(tmp_path, tiny_hub):
    root = _tree(tmp_path / "imgs")
    manifest = root / "m.jsonl"
    _write(manifest, [{"path": f"cat/{i}.png", "label": "cat"} for i in range(3)], "jsonl")
    args = ("extract", str(manifest), "-m", tiny_hub, "-w", "none", "--workers", "0")
    first = cli_json(*args)
    assert first["new"] == 3 and first["cache"].endswith(".h5") and "m.jsonl" in os.path.basename(first["cache"])
    assert cli_json(*args)["new"] == 0
    _write(manifest, [{"path": f"cat/{i}.png", "label": "cat"} for i in range(2)] + [{"path": "dog/0.png", "label": "dog"}], "jsonl")
    third = cli_json(*args)
    assert (third["new"], third["removed"], third["rows"], third["classes"]) == (1, 1, 3, ["cat", "dog"])
    status = cli_json("status", third["cache"])
    assert status["not_extracted"] == 0 and status["gone_from_disk"] == 0


def test_bad_manifests_are_one_clear_line(tmp_path, tiny_hub):
    from pipeline.images import scan_source

    root = _tree(tmp_path / "imgs")
    no_col = _write(root / "a.csv", [{"file": "cat/0.png"}], "csv")
    p = run_cli("extract", str(no_col), "-m", tiny_hub, "-w", "none", "--out", str(tmp_path / "c.h5"))  # as users see it: exit 2, one line
    assert p.returncode == 2 and p.stderr.strip() == (f"error: manifest {str(no_col.resolve())!r} has no column 'path' (columns: file); "
                                                      "name it with --path-col")
    assert not (tmp_path / "c.h5").exists()
    (root / "b.jsonl").write_text('{"path": "cat/0.png"}\nnot json\n')
    (root / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    _write(root / "d.csv", [{"path": "nope.png"}], "csv")
    (root / "notes.txt").write_text("hello")
    for name, needle in [("b.jsonl", "line 2 is not JSON"), ("c.parquet", "not a readable Parquet file"), ("d.csv", "lists no usable image (1 rows, 1 skipped, e.g. nope.png"),
                         ("notes.txt", "is a file but not a manifest"), ("none.csv", "does not exist")]:
        with pytest.raises(DataError, match=re.escape(needle)):
            scan_source(root / name)


def test_predict_and_finetune_read_the_manifest(tmp_path, tiny_hub):
    root = _tree(tmp_path / "imgs")
    rows = [{"path": f"{c}/{i}.png", "label": c, "split": "train" if i < 2 else "val"} for c in ("cat", "dog") for i in range(3)]
    manifest = _write(root / "m.csv", rows, "csv")
    run_extract(manifest, tiny_hub, "none", tmp_path / "c.h5", workers=0)
    assert run_cli("fit-head", str(tmp_path / "c.h5"), "--out", str(tmp_path / "h.pt"), "-q").returncode == 0
    pred = cli_json("predict", str(tmp_path / "h.pt"), str(manifest), "--trust-hub")
    assert len(pred["predictions"]) == 6 and {r["true"] for r in pred["predictions"]} == {"cat", "dog"}
    ft = run_cli("finetune", str(tmp_path / "h.pt"), "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--batch-size", "4", "--workers", "0", "-q",
                 "--trust-hub")
    assert ft.returncode == 0, ft.stderr


def test_hostile_paths_in_a_manifest_are_skipped_rows(tmp_path):
    root = _tree(tmp_path / "imgs")
    manifest = _write(root / "h.jsonl", [{"path": "cat/\x00.png", "label": "cat"}, {"path": "../../../../etc/passwd\n", "label": "dog"},
                                         {"path": "cat/0.png", "label": "cat"}], "jsonl")
    scan = scan_manifest(manifest)
    assert "cat/0.png" in [r.relpath for r in scan.records]  # a path outside the folder is read (or skipped) like any other
    assert ("cat/\\x00.png", "h.jsonl row 1: 'path' holds a NUL byte (no file name can)") in scan.skipped


def test_one_file_spelled_several_ways_is_one_row_kept_at_its_first_listing(tmp_path):
    """``cat/0.png``, ``./cat//0.png``, ``dog/../cat/0.png`` and its absolute path are one file:
    one row, under the key a folder scan gives it, with the first listing's label; a file
    outside the manifest's folder is one row under its absolute path, however it is reached."""
    root = _tree(tmp_path / "imgs")
    outside = make_image(tmp_path / "other" / "x.png", seed=7)
    rows = [{"path": "./cat//0.png", "label": "cat"}, {"path": str(root / "cat" / "0.png"), "label": "dog"},
            {"path": "dog/../cat/0.png", "label": "dog"}, {"path": "../other/x.png", "label": "dog"},
            {"path": str(outside), "label": "cat"}, {"path": "../imgs/dog/1.png", "label": "dog"}]
    scan = scan_manifest(_write(root / "m.csv", rows, "csv"))
    got = {r.relpath: scan.classes[r.label] for r in scan.records}
    assert got == {"cat/0.png": "cat", str(outside): "dog", "dog/1.png": "dog"}
    assert got.keys() <= {r.relpath for r in scan_folder(root).records} | {str(outside)}
    again = "listed again (first listing kept)"
    assert scan.skipped == [("cat/0.png", f"m.csv row 3: {again}"), ("cat/0.png", f"m.csv row 4: {again}"), (str(outside), f"m.csv row 6: {again}")]


def test_paths_no_row_may_have_are_skipped_with_their_row(tmp_path):
    root = _tree(tmp_path / "imgs")
    rows = [{"path": "cat/" + "x" * 5000 + ".png", "label": "cat"}, {"path": "cat/" + "é" * 200 + ".png", "label": "cat"},
            {"path": "https://example.com/cat.png", "label": "cat"}, {"path": "cat/1.png", "label": "cat"}]
    scan = scan_manifest(_write(root / "m.jsonl", rows, "jsonl"))
    assert [r.relpath for r in scan.records] == ["cat/1.png"]
    reasons = [reason for _, reason in scan.skipped]
    assert reasons[0].startswith("m.jsonl row 1: 'path' is ") and "a path may have at most 4,096" in reasons[0]
    assert "m.jsonl row 2: 'path' has a component of 404 bytes" in reasons[1]
    assert reasons[2] == "m.jsonl row 3: 'path' is a URL; rows are keyed by the file's path relative to the data root"
    assert all(len(p) <= 201 for p, _ in scan.skipped)  # a 5 kB path is not repeated whole in every report
