"""Hardening sweep: every command, fed the wrong thing, answers with one line that names
it and says what to do, a documented non-zero exit code, no traceback, nothing half-written."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from conftest import make_image, run_cli
from sealing import rewrite_sealed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def things(tmp_path_factory, tiny_head):
    """Good and bad inputs, made once."""
    t = tmp_path_factory.mktemp("things")
    head = Path(tiny_head)
    cache = head.with_name("tiny.h5")
    (t / "empty").mkdir()
    (t / "text.txt").write_text("hello")
    (t / "job_dir.toml").mkdir()
    make_image(t / "one class" / "only" / "a.png", seed=1)
    make_image(t / "one class" / "only" / "b.png", seed=2)
    loop = t / "loop"
    make_image(loop / "cls_a" / "x.png", seed=3)
    make_image(loop / "cls_b" / "y.png", seed=4)
    os.symlink(loop / "cls_a", loop / "cls_a" / "again")  # a folder that contains itself
    weird = t / "wéird dåta" / "clåss ä"
    make_image(weird / "ïmage 1.png", seed=5)
    make_image(t / "wéird dåta" / "cls b" / "z z.png", seed=6)
    (t / "trunc.h5").write_bytes(cache.read_bytes()[:2000])
    with h5py.File(t / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    newer = t / "newer.h5"
    shutil.copy(cache, newer)
    shutil.copytree(cache.with_name(cache.name + ".parts"), newer.with_name(newer.name + ".parts"))
    rewrite_sealed(newer, lambda f: f.attrs.__setitem__("schema_version", 99))
    torch.save({"weights": torch.zeros(2)}, t / "not_ours.pt")
    with open(t / "pickle.pt", "wb") as fh:
        pickle.dump({"a": 1}, fh)
    return {"head": str(head), "cache": str(cache), **{k: str(t / v) for k, v in {
        "empty": "empty", "text": "text.txt", "dirtoml": "job_dir.toml", "oneclass": "one class", "loop": "loop", "weird": "wéird dåta",
        "trunc": "trunc.h5", "foreign": "foreign.h5", "newer": "newer.h5", "notours": "not_ours.pt", "pickle": "pickle.pt",
        "missing": "missing/nothing.h5", "out": "out"}.items()}}


CASES = [
    # command line (with {placeholders}), exit code, words the one-line error must contain
    (["extract", "{missing}", "-m", "resnet18"], 2, ["missing/nothing.h5", "does not exist"]),
    (["extract", "{text}", "-m", "resnet18"], 2, ["text.txt", "is a file"]),
    (["extract", "{empty}", "-m", "resnet18"], 2, ["no images found"]),
    (["extract", "{loop}", "-m", "resnet18", "-w", "none", "--out", "{trunc}"], 5, ["trunc.h5", "not a readable HDF5"]),
    (["extract", "{loop}", "-m", "resnet18", "-w", "none", "--out", "{empty}"], 2, ["is a folder"]),
    (["extract", "{loop}", "-m", "resnet18", "-w", "none", "--out", "{newer}"], 5, ["newer.h5", "schema"]),
    (["status", "{trunc}"], 5, ["trunc.h5", "truncated or corrupt"]),
    (["status", "{foreign}"], 5, ["foreign.h5", "not a featcache cache"]),
    (["status", "{newer}"], 5, ["newer.h5", "schema", "upgrade"]),
    (["status", "{empty}"], 2, ["is a folder"]),
    (["status", "{notours}"], 5, ["not_ours.pt", "not a featcache head"]),
    (["fit-head", "{missing}"], 2, ["nothing.h5", "does not exist"]),
    (["fit-head", "{empty}"], 2, ["is a folder"]),
    (["fit-head", "{foreign}"], 5, ["not a featcache cache"]),
    (["fit-head", "{cache}", "--clf", "svm"], 2, ["--clf", "logreg"]),
    (["evaluate", "{notours}", "--cache", "{cache}"], 5, ["not_ours.pt", "not a featcache head"]),
    (["evaluate", "{pickle}", "--cache", "{cache}"], 5, ["pickle.pt", "cannot load it safely"]),
    (["evaluate", "{head}", "--cache", "{trunc}"], 5, ["trunc.h5"]),
    (["evaluate", "{head}", "--cache", "{newer}"], 5, ["newer.h5", "schema"]),
    (["predict", "{empty}", "{text}"], 2, ["is a folder"]),
    (["predict", "{head}", "{missing}"], 2, ["nothing.h5", "does not exist"]),
    (["predict", "{head}", "{empty}"], 2, ["no images found"]),
    (["compare", "{cache}", "{foreign}"], 5, ["foreign.h5"]),
    (["finetune", "{cache}"], 5, ["tiny.h5", "not a featcache head"]),
    (["finetune", "{missing}"], 2, ["does not exist"]),
    (["finetune", "{head}", "--data", "{empty}"], 2, ["no images found"]),
    (["finetune", "{head}", "--data", "{missing}"], 2, ["does not exist"]),
    (["run", "{dirtoml}"], 2, ["job_dir.toml", "is a folder"]),
    (["run", "{text}"], 2, ["text.txt", "not valid TOML"]),
    (["run", "{missing}"], 2, ["does not exist"]),
]


@pytest.mark.parametrize("args, code, needles", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _, _) in enumerate(CASES)])
def test_bad_input_one_line_error(things, args, code, needles):
    before = sorted(p.name for p in Path(things["empty"]).iterdir())
    proc = run_cli(*[a.format(**things) for a in args])
    assert proc.returncode == code, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], needle
    assert sorted(p.name for p in Path(things["empty"]).iterdir()) == before  # nothing half-written


def test_debug_shows_the_traceback(things):
    proc = run_cli("--debug", "status", things["trunc"])
    assert proc.returncode == 5 and "Traceback" in proc.stderr


def test_awkward_but_valid_inputs_work(things, tmp_path, tiny_hub):
    """Symlink loops are not followed forever; spaces and non-ASCII names round-trip; one class extracts but cannot fit."""
    from pipeline import load_cache

    loop = run_cli("extract", things["loop"], "-m", tiny_hub, "-w", "none", "--out", str(tmp_path / "loop.h5"), "--workers", "0")
    assert loop.returncode == 0, loop.stderr
    assert sorted(load_cache(tmp_path / "loop.h5").paths) == ["cls_a/x.png", "cls_b/y.png"]

    out = tmp_path / "ütf 8" / "c é.h5"
    weird = run_cli("extract", things["weird"], "-m", tiny_hub, "-w", "none", "--out", str(out), "--workers", "0")
    assert weird.returncode == 0, weird.stderr
    c = load_cache(out)
    assert sorted(c.paths) == ["cls b/z z.png", "clåss ä/ïmage 1.png"] and c.classes == ["cls b", "clåss ä"]

    one = tmp_path / "one.h5"
    assert run_cli("extract", things["oneclass"], "-m", tiny_hub, "-w", "none", "--out", str(one), "--workers", "0").returncode == 0
    fit = run_cli("fit-head", str(one), "--out", str(tmp_path / "h.pt"))
    assert fit.returncode == 2 and "only one class" in fit.stderr and not (tmp_path / "h.pt").exists()


def test_unreadable_file_is_a_recorded_failure(things, tmp_path, tiny_hub, monkeypatch):
    """Permission denied on one image: recorded with its reason, exit 3, the rest extracted.
    (Simulated in-process where the tests run as root, which ignores file permissions.)"""
    from pipeline.extract import run_extract
    from pipeline.images import decode as data_mod

    root = tmp_path / "perm"
    make_image(root / "a" / "ok.png", seed=1)
    make_image(root / "b" / "secret.png", seed=2)
    make_image(root / "b" / "ok2.png", seed=3)
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data_mod, "open", guarded_open, raising=False)
    s = run_extract(root, tiny_hub, "none", tmp_path / "p.h5", workers=0)
    assert s.new == 2 and s.failures == [("b/secret.png", "permission denied")]


def test_disk_full_while_saving_a_head_keeps_the_old_one(things, tmp_path, monkeypatch):
    """ENOSPC halfway through writing an artifact: a clear StorageError, the previous file
    byte-identical, no temporary left behind (the same atomic path serves heads, models, checkpoints)."""
    import errno

    from pipeline.errors import StorageError
    from pipeline.heads.fit import fit_head

    target = tmp_path / "h.head.pt"
    fit_head(things["cache"], "logreg", target, plots=False)
    before = target.read_bytes()
    import pipeline.store.atomic as atomic

    def full_disk(path):  # the bytes were written, the flush to disk finds no space (delayed allocation)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_path", full_disk)
    with pytest.raises(StorageError, match="disk is full.*nothing was changed"):
        fit_head(things["cache"], "logreg", target, C=0.5, plots=False)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_random_init_seed_is_part_of_the_backbone_identity(tmp_path, image_tree, tiny_hub):
    """Two seeds of --weights none are two backbones: their rows never share a cache, and a
    head fitted on one refuses the other (exit 5); the default cache names differ."""
    from pipeline.extract import default_cache_path

    cache = tmp_path / "c.h5"
    assert run_cli("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--out", str(cache), "--workers", "0").returncode == 0
    mixed = run_cli("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--seed", "7", "--out", str(cache), "--workers", "0")
    assert mixed.returncode == 5 and "seed 7" in mixed.stderr and "seed 0" in mixed.stderr and "Traceback" not in mixed.stderr
    other = tmp_path / "c7.h5"
    assert run_cli("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--seed", "7", "--out", str(other), "--workers", "0").returncode == 0
    head = tmp_path / "h.pt"
    assert run_cli("fit-head", str(cache), "--clf", "knn", "--out", str(head)).returncode == 0
    refused = run_cli("evaluate", str(head), "--cache", str(other))
    assert refused.returncode == 5 and "seed" in refused.stderr
    assert default_cache_path("m", "none", image_tree, seed=7) != default_cache_path("m", "none", image_tree)


@pytest.mark.parametrize("args, needle", [
    (["fit-head", "{cache}", "--clf", "mlp", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["fit-head", "{cache}", "--clf", "mlp", "--epochs", "-1"], "--epochs must be at least 1"),
    (["fit-head", "{cache}", "--val-fraction", "-0.5"], "--val-fraction must be in [0, 1)"),
    (["fit-head", "{cache}", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["fit-head", "{cache}", "--C", "-3"], "--C must be more than 0"),
    (["extract", "{data}", "-m", "resnet18", "--commit-every", "0"], "--commit-every must be at least 1"),
    (["extract", "{data}", "-m", "resnet18", "--max-pixels", "-5"], "--max-pixels must be at least 1"),
    (["extract", "{data}", "-m", "resnet18", "--workers", "-3"], "--workers must be 0 or more"),
])
def test_out_of_range_options_are_refused_up_front(things, image_tree, tmp_path, args, needle):
    """Every numeric option has its range in its stage's options dataclass: exit 2, one line, nothing written."""
    subs = {"{cache}": str(things["cache"]), "{data}": str(image_tree)}
    env = {"FEATCACHE_HEAD_DIR": str(tmp_path / "heads"), "FEATCACHE_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_cli(*[subs.get(a, a) for a in args], env=env)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "heads").exists() and not (tmp_path / "cache").exists()


def test_job_file_values_out_of_range_fail_the_dry_run(tmp_path, image_tree):
    job = tmp_path / "job.toml"
    job.write_text(f'data = ["{image_tree}"]\n[[backbones]]\nmodel = "resnet18"\nbatch_size = 0\ncommit_every = 0\nmax_pixels = -5\n'
                   'workers = -3\n[[heads]]\nclf = "logreg"\nC = -3\n[[heads]]\nname = "m"\nclf = "mlp"\nhidden = ["a"]\n')
    proc = run_cli("run", str(job), "--dry-run")
    assert proc.returncode == 2 and "--batch-size must be at least 1" in proc.stderr and "--C must be more than 0" in proc.stderr
    assert "hidden" in proc.stderr and "Traceback" not in proc.stderr


def _without_root_file_powers() -> list[str]:
    """A command prefix under which file permissions apply: nothing when not root; as root,
    ``setpriv`` dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root reads a chmod-000 file,
    so the test would prove nothing)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_an_unreadable_image_is_a_per_file_failure(tmp_path, tiny_hub):
    """A chmod-000 image (the adversarial run could not test it as root) is listed with its
    reason, exit 3, and the other images are extracted."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    for i, cls in enumerate(("a", "b")):
        make_image(tmp_path / "data" / cls / "ok.png", seed=i)
    locked = make_image(tmp_path / "data" / "a" / "locked.png", seed=5)
    locked.chmod(0o000)
    try:
        prefix = _without_root_file_powers()
        assert subprocess.run([*prefix, "cat", str(locked)], capture_output=True).returncode != 0  # permissions really apply
        proc = subprocess.run([*prefix, sys.executable, str(ROOT / "cli.py"), "extract", str(tmp_path / "data"), "-m", tiny_hub, "-w", "none",
                               "--out", str(tmp_path / "c.h5"), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 3, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["new"] == 2 and summary["failures"] == [{"path": "a/locked.png", "reason": "permission denied"}]
    finally:
        locked.chmod(0o644)
