"""Several backbones in one pass: each file read and decoded once, one cache per backbone,
each row equal to what a single-backbone extract writes."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.errors import UsageError
from pipeline.extract import extract_many, run_extract
from pipeline.images import decode as data

from conftest import cli_json, make_image, run_cli

SECOND = "mobilenet_v3_small"  # 224 px with its own resize/crop: a different preprocessing than tinybn's 32 px


@pytest.fixture
def count_decodes(monkeypatch):
    calls: list[int] = []
    real = data.decode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import pipeline.images.reader as reader

    monkeypatch.setattr(reader, "decode_image", counting)
    return calls


def test_one_decode_per_file_and_rows_equal_single_runs(tmp_path, image_tree, tiny_hub, count_decodes):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    both = extract_many(image_tree, [tiny_hub, SECOND], [a, b], weights="none", workers=0, batch_size=5, engine="eager")
    assert len(count_decodes) == 12  # 12 files, two backbones, one decode each
    assert [s.new for s in both] == [12, 12] and [s.model for s in both] == [tiny_hub, SECOND]
    count_decodes.clear()
    run_extract(image_tree, tiny_hub, "none", tmp_path / "a1.h5", workers=0, batch_size=5, engine="eager")
    run_extract(image_tree, SECOND, "none", tmp_path / "b1.h5", workers=0, batch_size=5, engine="eager")
    assert len(count_decodes) == 24
    for shared, single in [(a, tmp_path / "a1.h5"), (b, tmp_path / "b1.h5")]:
        x, y = load_cache(shared), load_cache(single)
        assert list(x.paths) == list(y.paths) and x.labels.tolist() == y.labels.tolist()
        assert x.meta["preprocessing"] == y.meta["preprocessing"]
        np.testing.assert_allclose(x.embeddings, y.embeddings, rtol=1e-5, atol=1e-6)
    assert load_cache(a).meta["preprocessing"] != load_cache(b).meta["preprocessing"]


def test_only_what_each_cache_lacks_is_decoded(tmp_path, image_tree, tiny_hub, count_decodes):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run_extract(image_tree, tiny_hub, "none", a, workers=0)  # a is complete
    make_image(image_tree / "cat" / "new.png", seed=99)
    count_decodes.clear()
    first, second = extract_many(image_tree, [tiny_hub, SECOND], [a, b], weights="none", workers=0, batch_size=4)
    assert (first.new, first.cached, second.new, second.cached) == (1, 12, 13, 0)
    assert len(count_decodes) == 13
    assert len(load_cache(a)) == 13 and len(load_cache(b)) == 13


def test_a_broken_file_fails_for_every_backbone(tmp_path, image_tree, tiny_hub):
    (image_tree / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    first, second = extract_many(image_tree, [tiny_hub, SECOND], [tmp_path / "a.h5", tmp_path / "b.h5"], weights="none", workers=2, batch_size=4)
    assert [p for p, _ in first.failures] == ["dog/bad.jpg"] == [p for p, _ in second.failures]
    assert first.new == second.new == 12


def test_the_same_backbone_twice_or_one_cache_twice_is_refused(tmp_path, image_tree, tiny_hub):
    with pytest.raises(UsageError, match="same backbone twice"):
        extract_many(image_tree, [tiny_hub, tiny_hub], weights="none")
    with pytest.raises(UsageError, match="same cache"):
        extract_many(image_tree, [tiny_hub, SECOND], [tmp_path / "x.h5", tmp_path / "x.h5"], weights="none")
    assert not (tmp_path / "x.h5").exists()


def test_cli_several_models(tmp_path, image_tree, tiny_hub):
    out = cli_json("extract", str(image_tree), "--model", tiny_hub, "--model", SECOND, "--weights", "none", "--workers", "0",
                   "--out", str(tmp_path / "a.h5"), "--out", str(tmp_path / "b.h5"))
    assert [c["model"] for c in out["caches"]] == [tiny_hub, SECOND] and out["exit_code"] == 0
    assert [c["new"] for c in out["caches"]] == [12, 12]
    proc = run_cli("extract", str(image_tree), "--model", tiny_hub, "--model", SECOND, "--weights", "none", "--out", str(tmp_path / "c.h5"))
    assert proc.returncode == 2 and "--out was given 1 times for 2 --model values" in proc.stderr
    assert not (tmp_path / "c.h5").exists()


def test_a_refused_cache_releases_every_lock(tmp_path, image_tree, tiny_hub):
    """The second cache belongs to another backbone: the run is refused, and no lock stays held."""
    from pipeline.errors import IncompatibleError
    from pipeline.store.locks import WriterLock

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run_extract(image_tree, tiny_hub, "none", b, workers=0)  # b holds tinybn rows
    with pytest.raises(IncompatibleError):
        extract_many(image_tree, [SECOND, SECOND.replace("small", "large")], [a, b], weights="none", workers=0)
    for path in (a, b):
        WriterLock(path).acquire().release()  # would raise LockHeldError if a lock leaked
    assert not a.exists()
