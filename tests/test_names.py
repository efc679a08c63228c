"""Names from users' data: one rule for what a row path may be (folder scans, manifests and
imports share it), and every human-readable output shows names with control characters
escaped, so one record stays on one line."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.names import printable, row_path_problem
from pipeline.store import CacheWriter, new_cache_meta

from conftest import make_image


@pytest.mark.parametrize("path, absolute_ok, needle", [
    ("cat/0.png", False, None),
    ("cat/new\nline\t.png", False, None),  # control characters are legal file names: stored as they are
    ("/data/cat/0.png", True, None),  # a manifest's row outside its folder
    ("", False, "is empty"),
    ("cat/\x00.png", False, "NUL byte"),
    ("x" * 5_000_000, False, "5,000,000 bytes long"),
    ("a/" * 2049, False, "bytes long"),
    ("cat/" + "é" * 128 + ".png", False, "component of 260 bytes"),  # 255 bytes per name, counted in UTF-8
    ("/data/cat/0.png", False, "is absolute"),
    ("../cat/0.png", False, "'..' component; a row path stays inside the data root"),
    ("cat/../dog/0.png", False, "write it as 'dog/0.png'"),
    ("cat//0.png", False, "write it as 'cat/0.png'"),
    ("./cat/0.png", False, "write it as 'cat/0.png'"),
    ("cat/", False, "empty component"),
    ("https://example.com/0.png", False, "is a URL"),
])
def test_the_row_path_rule(path, absolute_ok, needle):
    problem = row_path_problem(path, absolute_ok=absolute_ok)
    assert problem is None if needle is None else needle in problem


def test_printable_escapes_what_would_break_a_line():
    assert printable("cat/0.png") == "cat/0.png"
    assert printable("a\nb\tc\x00d\x1b[31m\udcff") == "a\\nb\\tc\\x00d\\x1b[31m\\udcff"


def test_a_folder_scan_stores_a_newline_name_and_skips_a_path_too_long_to_store(tmp_path, monkeypatch):
    from pipeline.images import folders, scan_folder

    make_image(tmp_path / "imgs" / "cat" / "new\nline.png")
    make_image(tmp_path / "imgs" / "cat" / "ok.png")
    monkeypatch.setattr("pipeline.names.MAX_PATH_BYTES", 12)  # no file system here holds a path over 4096 bytes
    scan = scan_folder(tmp_path / "imgs")
    assert [r.relpath for r in scan.records] == ["cat/ok.png"]
    assert scan.skipped == [("cat/new\\nline.png", "path is 16 bytes long; a path may have at most 12")]
    monkeypatch.undo()
    assert folders.scan_folder(tmp_path / "imgs").records[0].relpath == "cat/new\nline.png"


def _cache_with_odd_names(path):
    classes = ["bad\nclass", "ok"]
    meta = new_cache_meta("testnet", 4, classes, weights="none", data_root="/nowhere", layout="imagefolder")
    with CacheWriter.open(path, meta) as w:
        w.add_columns(["bad\nclass/0.png", "ok/1.png", "ok/2.png"], np.eye(3, 4, dtype=np.float32), labels=[0, 1, 1], split=["train", "val", "val"])
        w.add_failure("bad\nclass/x.png", "cannot decode:\nbad header", 10, 0)
    return path


def test_status_shows_control_characters_escaped(tmp_path):
    from pipeline.status import cache_status, format_cache_status

    text = format_cache_status(cache_status(_cache_with_odd_names(tmp_path / "odd.h5"), check_disk=False))
    lines = text.splitlines()
    assert "  bad\\nclass  1" in lines and "  bad\\nclass/x.png: cannot decode:\\nbad header" in lines
    assert not any(re.match(r"(class|bad header)\b", line) for line in lines)  # no record broken over two lines


def test_fit_head_summary_and_audit_text_escape_class_names():
    from pipeline.heads import format_metrics
    from pipeline.quality import run_audit
    from pipeline.quality.advice import advice
    from pipeline.quality.audit import format_audit

    per_class = {"bad\nclass": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}, "ok": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}}
    text = format_metrics("val", {"n": 6, "accuracy": 1.0, "macro_f1": 1.0, "log_loss": 0.1, "per_class": per_class})
    assert len(text.splitlines()) == 4 and any(line.startswith("  bad\\nclass ") for line in text.splitlines())
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 2)  # "tiny\nclass" is a minority class: named in the audit and its advice
    audit = run_audit(rng.normal(size=(42, 8)).astype(np.float32), labels, np.array(["train"] * 42, dtype=object),
                      np.array([f"{i}.png" for i in range(42)]), ["big", "tiny\nclass"])
    text = format_audit(audit, advice(audit))
    assert "tiny\\nclass" in text and not any(re.match(r"class\b", line) for line in text.splitlines())
