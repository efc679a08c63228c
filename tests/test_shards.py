"""WebDataset tar shards as inputs: the same embeddings as the folder of the same images,
read in place, incremental by shard without opening unchanged shards, damaged members and
shards skipped with reasons, and a SIGKILL mid-shard resumed without loss or duplicates."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.extract import run_extract
from pipeline.images import scan_folder
from pipeline.images.shards import expand_braces, scan_shards
from pipeline.status import cache_status

from conftest import cli_json, make_image, run_cli
from test_crash import _generation, _start, _wait_for


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(folder, out_dir, per_shard: int = 4, label_ext: str = "txt") -> list:
    """The folder's images as WebDataset shards (KEY.png/jpg + KEY.txt class name or KEY.cls index)."""
    scan = scan_folder(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(scan.records), per_shard):
        path = out_dir / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for r in scan.records[s:s + per_shard]:
                key = r.relpath.rsplit(".", 1)[0].replace("/", "_")
                _add(tar, f"{key}.{r.relpath.rsplit('.', 1)[1]}", (folder / r.relpath).read_bytes())
                label = scan.classes[r.label] if label_ext == "txt" else str(r.label)
                _add(tar, f"{key}.{label_ext}", label.encode())
        paths.append(path)
    return paths


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(5):
            make_image(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}", size=(40, 36), seed=10 * c + i)
    return root


def test_brace_ranges_and_lists_expand_like_webdataset():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]


@pytest.mark.parametrize("label_ext", ["txt", "cls"])
def test_shards_give_the_same_embeddings_as_the_folder(tree, tmp_path, tiny_hub, label_ext):
    _shards(tree, tmp_path / "shards", label_ext=label_ext)
    a = run_extract(tree, tiny_hub, "none", tmp_path / "folder.h5", workers=0)
    b = run_extract(str(tmp_path / "shards" / "train-{000000..000002}.tar"), tiny_hub, "none", tmp_path / "shards.h5", workers=2)
    assert a.new == b.new == 10 and b.classes == (["cat", "dog"] if label_ext == "txt" else ["0", "1"])
    fa, fb = load_cache(tmp_path / "folder.h5"), load_cache(tmp_path / "shards.h5")
    key = {p.rsplit(".", 1)[0].replace("/", "_"): i for i, p in enumerate(fa.paths)}
    order = [key[p.split("/", 1)[1].rsplit(".", 1)[0]] for p in fb.paths]  # train-000000.tar/cat_0.png -> cat/0.png
    assert list(fb.paths[:2]) == ["train-000000.tar/cat_0.png", "train-000000.tar/cat_1.jpg"]
    np.testing.assert_array_equal(fa.labels[order], fb.labels)
    np.testing.assert_array_equal(fa.embeddings[order], fb.embeddings)
    assert fb.meta["layout"] == "shards" and fb.meta["data_root"].endswith("train-{000000..000002}.tar")


def test_unchanged_shards_are_not_opened_again_and_a_rewritten_one_is_reextracted(tree, tmp_path, tiny_hub, monkeypatch):
    shards = _shards(tree, tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "train-*.tar")
    index = tmp_path / "index"
    first = scan_shards(pattern, index)
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("an unchanged shard was opened"))
    again = scan_shards(pattern, index)
    assert again.records == first.records and len(again.records) == 10
    monkeypatch.undo()

    args = ("extract", pattern, "-m", tiny_hub, "-w", "none", "--workers", "0", "--out", str(tmp_path / "c.h5"))
    assert cli_json(*args)["new"] == 10
    assert cli_json(*args)["new"] == 0
    with tarfile.open(shards[1], "w") as tar:  # rewrite shard 1 with one image fewer
        _add(tar, "dog_9.png", (tree / "dog" / "0.png").read_bytes())
        _add(tar, "dog_9.txt", b"dog")
    third = cli_json(*args)
    assert (third["new"], third["removed"], third["rows"]) == (1, 4, 7)


def test_damaged_members_and_shards_fail_alone(tree, tmp_path, tiny_hub):
    good, second, third = _shards(tree, tmp_path / "shards")
    with tarfile.open(second, "w") as tar:  # a corrupt image among good ones
        _add(tar, "bad.jpg", b"\xff\xd8\xff not really a jpeg")
        _add(tar, "bad.txt", b"cat")
        _add(tar, "ok.png", (tree / "cat" / "0.png").read_bytes())
        _add(tar, "ok.txt", b"cat")
    with tarfile.open(third) as tar:
        members = tar.getmembers()
    third.write_bytes(third.read_bytes()[: members[2].offset_data + 10])  # cut inside its second image

    (tmp_path / "shards" / "train-000003.tar").write_bytes(b"this is not a tar file at all" * 40)
    out = cli_json("extract", str(tmp_path / "shards" / "train-*.tar"), "-m", tiny_hub, "-w", "none", "--workers", "0",
                   "--out", str(tmp_path / "c.h5"), expect=3)
    failures = {f["path"]: f["reason"] for f in out["failures"]}
    assert set(failures) == {"train-000001.tar/bad.jpg", "train-000002.tar", "train-000003.tar"} and out["skipped"] == []
    assert "not a tar file" in failures["train-000003.tar"]
    assert failures["train-000002.tar"].startswith("truncated shard") and members[2].name in failures["train-000002.tar"]
    c = load_cache(tmp_path / "c.h5")
    assert {p for p in c.paths if p.startswith("train-000000.tar")} == {f"train-000000.tar/{n}" for n in
                                                                        ("cat_0.png", "cat_1.jpg", "cat_2.png", "cat_3.jpg")}
    assert "train-000001.tar/ok.png" in set(c.paths)
    assert {p for p in c.paths if p.startswith("train-000002.tar")} == {"train-000002.tar/" + members[0].name}  # the member before the cut


def _link(tar: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    tar.addfile(info)


def test_missing_members_are_failures_in_status_and_retried_once_the_shard_is_repaired(tree, tmp_path, tiny_hub):
    """A shard cut where a header begins (tarfile stops there without a word) and link members
    used to vanish with no record: exit 0, status 'failed 0, pending 0'. Missing is failed."""
    whole, links = _shards(tree, tmp_path / "shards", per_shard=6)
    full = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    whole.write_bytes(full[: members[6].offset])  # 6 of its 12 members gone
    with tarfile.open(links, "a") as tar:
        _link(tar, "cat_link.png", "dog_1.png")
        _link(tar, "dog_hard.jpg", "dog_2.jpg", hard=True)
        _add(tar, "dog_9.png", (tree / "dog" / "0.png").read_bytes())
        _link(tar, "dog_9.txt", "dog_1.txt")
    pattern, out = str(tmp_path / "shards" / "train-*.tar"), tmp_path / "c.h5"

    first = run_extract(pattern, tiny_hub, "none", out, workers=0)
    failures = dict(first.failures)
    assert set(failures) == {"train-000000.tar", "train-000001.tar/cat_link.png", "train-000001.tar/dog_hard.jpg", "train-000001.tar/dog_9.png"}
    assert (first.new, first.failed, first.skipped) == (7, 4, [])  # the CLI exits 3 on failed > 0
    cut = failures["train-000000.tar"]
    assert cut.startswith("truncated shard") and members[5].name in cut and "copy the shard again" in cut
    assert "symbolic link to 'dog_1.png'" in failures["train-000001.tar/cat_link.png"]
    assert "hard link" in failures["train-000001.tar/dog_hard.jpg"] and "not followed" in failures["train-000001.tar/dog_hard.jpg"]
    assert "dog_9.txt" in failures["train-000001.tar/dog_9.png"]
    status = cache_status(out, verify=False)
    assert (status["failed"], status["not_extracted"], status["gone_from_disk"]) == (4, 0, 0)
    assert {f["path"] for f in status["failures"]} == set(failures)

    again = run_extract(pattern, tiny_hub, "none", out, workers=0)
    assert (again.new, again.new_failed, again.failed, again.removed) == (0, 0, 4, 0)  # recorded once

    whole.write_bytes(full)  # the shard copied again
    repaired = run_extract(pattern, tiny_hub, "none", out, workers=0)
    assert (repaired.new, repaired.failed) == (6, 3) and "train-000000.tar" not in dict(repaired.failures)  # a rewritten shard: all of it
    assert len(load_cache(out)) == 10


def test_verify_content_hashes_members_in_place(tmp_path, tiny_hub):
    """A shard rewritten with other pixels of the same sizes, its mtime restored: members are
    hashed where they lie in the shard and the changed one is extracted again."""
    images = [make_image(tmp_path / "src" / f"{i}.bmp", size=(40, 36), seed=i, fmt="BMP").read_bytes() for i in range(5)]
    shard = tmp_path / "shards" / "s-000000.tar"
    shard.parent.mkdir()

    def write(contents: list) -> None:
        with tarfile.open(shard, "w") as tar:
            for i, data in enumerate(contents):
                _add(tar, f"k{i}.bmp", data)
                _add(tar, f"k{i}.txt", b"cat" if i % 2 else b"dog")

    hour_ago = time.time_ns() - 3600 * 10**9
    write(images[:4])
    os.utime(shard, ns=(hour_ago, hour_ago))
    out = tmp_path / "c.h5"
    assert run_extract(str(shard), tiny_hub, "none", out, workers=0).new == 4
    before = load_cache(out)
    write([images[0], images[4], images[2], images[3]])  # k1 has other pixels, same size
    os.utime(shard, ns=(hour_ago, hour_ago))
    assert run_extract(str(shard), tiny_hub, "none", out, workers=0).new == 0  # size + mtime: documented
    checked = run_extract(str(shard), tiny_hub, "none", out, workers=0, verify_content=True)
    assert (checked.new, checked.hashed, checked.content_changed) == (1, 4, 1)
    after = load_cache(out)
    changed = [p for p, a, b in zip(after.paths, before.embeddings, after.embeddings) if not np.array_equal(a, b)]
    assert changed == ["s-000000.tar/k1.bmp"]


def test_sigkill_mid_shard_resumes_without_loss_or_duplicates(tmp_path):
    root = tmp_path / "imgs"
    for i in range(40):
        make_image(root / ("a" if i % 2 else "b") / f"{i:03d}.jpg", size=(96, 80), seed=i)
    _shards(root, tmp_path / "shards", per_shard=20)
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    args = ("-m", "resnet50", "-w", "none", "--batch-size", "4", "--commit-every", "4", "--workers", "0", "-q")
    out = tmp_path / "c.h5"
    proc = _start("extract", pattern, *args, "--out", str(out))
    assert _wait_for(lambda: _generation(out) >= 2), "no commit"
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(load_cache(out))
    assert 8 <= partial < 40
    resumed = run_cli("extract", pattern, *args, "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["cached"], summary["new"]) == (partial, 40 - partial)
    c = load_cache(out)
    assert len(c.paths) == len(set(c.paths)) == 40
