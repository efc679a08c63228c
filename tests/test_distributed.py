"""torchrun on CPU (gloo, 2 processes): the same cache as one process, a dead rank loses only
its in-flight work, and DDP with 2 ranks x batch B takes the same step as 1 rank x batch 2B."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import load_cache

from conftest import ROOT, make_image, run_cli

pytestmark = pytest.mark.slow


def torchrun(*args: str, nproc: int = 2, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "cli.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for i in range(30):
        make_image(root / f"c{i % 3}" / f"{i:02d}.png", size=(40, 36), seed=i)
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def test_two_ranks_make_the_same_cache_as_one_process(folder, tmp_path, tiny_hub):
    args = ("-m", tiny_hub, "-w", "none", "--workers", "0", "--batch-size", "4")
    proc = torchrun("extract", str(folder), *args, "--out", str(tmp_path / "ddp.h5"), "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err  # torchrun turns every worker's non-zero exit into its own 1 ...
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    summary = json.loads(lines[0])
    assert summary["exit_code"] == 3  # ... so the summary carries the real one: finished, some inputs failed
    assert summary["world_size"] == 2 and summary["new"] == 30 and summary["failed"] == 1
    ranks = {m.group(1) for p in (tmp_path / "ddp.h5.parts").glob("part-*") if (m := re.search(r"-rank(\d)-", p.name))}
    assert ranks == {"0", "1"} or summary["commits"] >= 2  # both ranks wrote parts (compaction may merge them)

    single = run_cli("extract", str(folder), *args, "--out", str(tmp_path / "one.h5"))
    assert single.returncode == 3
    a, b = load_cache(tmp_path / "ddp.h5"), load_cache(tmp_path / "one.h5")
    assert list(a.paths) == list(b.paths) and list(a.labels) == list(b.labels) and a.classes == b.classes
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
    assert a.failures == b.failures and a.failures[0][0] == "c1/broken.png"


def test_a_dead_rank_loses_only_its_in_flight_work(tmp_path, tiny_hub):
    root = tmp_path / "many"
    for i in range(240):
        make_image(root / f"c{i % 2}" / f"{i:03d}.png", size=(40, 36), seed=i)
    out = tmp_path / "c.h5"
    parts = tmp_path / "c.h5.parts"
    proc = torchrun("extract", str(root), "-m", "resnet18", "-w", "none", "--workers", "0", "--batch-size", "2", "--commit-every", "4",
                    "--out", str(out))
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and proc.poll() is None and victim is None:
        found = [p for p in parts.glob("part-*-rank1-*.h5")] if parts.is_dir() else []
        if found:
            victim = int(re.search(r"-rank1-(\d+)-", found[0].name).group(1))
        time.sleep(0.05)
    assert victim is not None, "rank 1 never committed a part"
    os.kill(victim, signal.SIGKILL)  # rank 1 dies; torchrun then stops the job
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    committed = len(list(parts.glob("part-*.h5")))
    assert committed >= 1

    again = run_cli("extract", str(root), "-m", "resnet18", "-w", "none", "--workers", "0", "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["cached"] >= 4 and summary["cached"] + summary["new"] == 240  # the dead run's committed parts were kept
    ref = tmp_path / "ref.h5"
    assert run_cli("extract", str(root), "-m", "resnet18", "-w", "none", "--workers", "0", "--out", str(ref)).returncode == 0
    a, b = load_cache(out), load_cache(ref)
    assert list(a.paths) == list(b.paths)
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-5)


def _ddp_step(rank: int, world: int, init: str, hub: str, batch: int, out: str, n_images: int = 8) -> None:
    """One optimiser step of our Trainer (batch ``batch`` per rank) over this rank's share of ``n_images`` fixed images."""
    import torch.distributed as dist

    from pipeline.backbones.registry import load_backbone
    from pipeline.distributed import World
    from pipeline.finetune.augment import epoch_order
    from pipeline.finetune.model import assemble
    from pipeline.finetune.options import resolve_options
    from pipeline.finetune.trainer import Trainer
    from pipeline.heads.estimators import build_head_module
    from pipeline.images.reader import DecodedBatch

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 3, 32, 32, generator=g)
    labels = np.arange(n_images) % 3
    bb = load_backbone(hub, "none", seed=0)
    torch.manual_seed(0)
    model, _, _ = assemble(bb, build_head_module(bb.embed_dim, 3, (), ()), "all", 3, seed=0)
    opts = resolve_options({"epochs": 1, "batch_size": batch, "warmup": 0.0, "lr_backbone": 0.05, "momentum": 0.9})
    team = World(rank, world) if world > 1 else World()
    trainer = Trainer(model, opts, torch.device("cpu"), labels, team=team, input_size=32)
    mine = epoch_order(n_images, 0, 0, rank, world)
    assert len(mine) == batch  # exactly one step
    trainer.train_epoch([DecodedBatch(mine, images[mine], [""] * len(mine), [])], 0, 1)
    if rank == 0:
        torch.save(model.state_dict(), out)
    if world > 1:
        dist.destroy_process_group()


def test_ddp_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path, tiny_hub):
    import torch.multiprocessing as mp

    b = 4
    init = f"file://{tmp_path / 'pg'}"
    mp.start_processes(_ddp_step, args=(2, init, tiny_hub, b, str(tmp_path / "ddp.pt"), 2 * b), nprocs=2, start_method="spawn")
    _ddp_step(0, 1, "", tiny_hub, 2 * b, str(tmp_path / "one.pt"), 2 * b)
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    start = load_start(tiny_hub)
    moved = 0
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
        moved += not torch.equal(one[key], start[key])
    assert moved == 5  # the step changed every convolution and the head (and no BatchNorm tensor)


def load_start(hub: str) -> dict:
    from pipeline.backbones.registry import load_backbone
    from pipeline.finetune.model import assemble
    from pipeline.heads.estimators import build_head_module

    bb = load_backbone(hub, "none", seed=0)
    torch.manual_seed(0)
    model, _, _ = assemble(bb, build_head_module(bb.embed_dim, 3, (), ()), "all", 3, seed=0)
    return model.state_dict()


def test_torchrun_finetune_then_resume_on_one_process(tiny_head, tmp_path):
    out = tmp_path / "m.pt"
    proc = torchrun("finetune", str(tiny_head), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--json", "--trust-hub")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["epochs_done"] == 1  # rank 0 alone reports and writes
    state = torch.load(out.with_name("m.ckpt"), weights_only=True)
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])  # unwrapped: any world size can resume
    again = run_cli("finetune", str(tiny_head), "--out", str(out), "--resume", "--epochs", "2", "--workers", "0", "--json", "--trust-hub")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_from"] == 1 and json.loads(again.stdout)["epochs_done"] == 2


def test_two_ranks_fill_every_tapped_layer_cache_of_a_timm_model(folder, tmp_path):
    """torchrun with a timm backbone tapped at two layers: the same two caches as one process."""
    pytest.importorskip("timm", reason="the timm extra is not installed")
    args = ("-m", "timm:resnet10t", "-w", "none", "--layer", "layer3", "--layer", "layer4", "--workers", "0", "--batch-size", "4")
    proc = torchrun("extract", str(folder), *args, "--out", str(tmp_path / "ddp.h5"), "--json")
    out, err = proc.communicate(timeout=300)
    summary = json.loads(next(l for l in out.splitlines() if l.startswith("{")))
    assert [(c["layer"], c["world_size"], c["new"], c["failed"]) for c in summary["caches"]] == [("layer3", 2, 30, 1), ("layer4", 2, 30, 1)], err
    assert run_cli("extract", str(folder), *args, "--out", str(tmp_path / "one.h5")).returncode == 3
    for layer in ("layer3", "layer4"):
        a, b = load_cache(tmp_path / f"ddp__at-{layer}.h5"), load_cache(tmp_path / f"one__at-{layer}.h5")
        assert list(a.paths) == list(b.paths) and a.meta["layer"] == layer and a.failures == b.failures
        np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)


def test_two_ranks_fit_the_one_process_logreg(digits_cache, tmp_path):
    """torchrun fit-head --clf logreg (#32 item 2): each rank streams half of the training rows,
    the standardisation, loss and gradient are summed over the ranks, rank 0 writes the head:
    the one-process model (the same C, the same predictions, the objective to solver tolerance)."""
    from pipeline.heads import fit_head, load_head

    one = load_head(fit_head(digits_cache, "logreg", tmp_path / "one.pt", class_weight="balanced", plots=False).head_path)
    proc = torchrun("fit-head", str(digits_cache), "--clf", "logreg", "--class-weight", "balanced", "--out", str(tmp_path / "two.pt"), "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["head"] == str(tmp_path / "two.pt")  # rank 0 alone reports
    two = load_head(tmp_path / "two.pt")
    assert two.provenance["ranks"] == 2 and (one.provenance["fit_path"], two.provenance["fit_path"]) == ("in-memory", "streamed")
    assert two.head.C_ == one.head.C_
    mean1, scale1, coef1, _ = one.head.as_linear()
    mean2, scale2, coef2, _ = two.head.as_linear()
    np.testing.assert_allclose(mean2, mean1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scale2, scale1, rtol=1e-9)
    X = load_cache(digits_cache).embeddings
    np.testing.assert_array_equal(two.head.predict(X), one.head.predict(X))
    assert np.abs(coef2 - coef1).max() <= 1e-2 * np.abs(coef1).max()  # L-BFGS from the same start to the same tolerance


def test_two_ranks_evaluate_and_predict_a_cache_as_one_process(digits_cache, tmp_path):
    """evaluate and predict --cache under torchrun: each rank scores a contiguous share; the
    metrics (summed counts) and the predictions file (joined in rank order) equal one process's."""
    import pandas as pd

    from pipeline.heads import evaluate_head, fit_head

    head = fit_head(digits_cache, "logreg", tmp_path / "h.pt", C=0.01, plots=False).head_path
    one = evaluate_head(head, digits_cache)
    proc = torchrun("evaluate", head, "--cache", str(digits_cache), "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (printed,) = [line for line in out.splitlines() if line.startswith("{")]
    two = json.loads(printed)
    assert two["val"]["n"] == one["val"]["n"] > 300
    assert two["val"]["confusion_matrix"] == one["val"]["confusion_matrix"]
    assert two["val"]["log_loss"] == pytest.approx(one["val"]["log_loss"], rel=1e-12)
    assert run_cli("predict", head, "--cache", str(digits_cache), "--out", str(tmp_path / "one.csv")).returncode == 0
    proc = torchrun("predict", head, "--cache", str(digits_cache), "--out", str(tmp_path / "two.csv"), "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    a, b = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert len(a) == 1797 and list(a.path) == list(b.path) and list(a.predicted) == list(b.predicted)
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-6)
    assert not [p for p in tmp_path.iterdir() if ".rank" in p.name]


@pytest.mark.parametrize("kind, extra", [("linear", ["--batch-size", "37"]),
                                         ("mlp", ["--batch-size", "50", "--hidden", "32", "--dropout", "0.3", "--class-weight", "balanced"])])
def test_two_ranks_train_the_one_process_torch_head(digits_cache, tmp_path, kind, extra):
    """torchrun fit-head --clf linear|mlp (#32 item 2): every rank draws the same global batches
    (and dropout masks), trains on its share of each, and the gradients are summed: the one
    process's weights, epoch by epoch, to float rounding; rank 0 alone writes the head."""
    from pipeline.heads import load_head

    args = ["fit-head", str(digits_cache), "--clf", kind, "--epochs", "3", "--stream", "--json", *extra]
    assert run_cli(*args, "--out", str(tmp_path / "one.pt")).returncode == 0
    proc = torchrun(*args, "--out", str(tmp_path / "two.pt"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert len([line for line in out.splitlines() if line.startswith("{")]) == 1
    one, two = load_head(tmp_path / "one.pt"), load_head(tmp_path / "two.pt")
    assert two.provenance["ranks"] == 2
    a, b = one.head.get_state()["state_dict"], two.head.get_state()["state_dict"]
    assert a.keys() == b.keys() and len(a) >= 4
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert len(one.extra["history"]) == 3
    for h1, h2 in zip(one.extra["history"], two.extra["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert h2["train_accuracy"] == h1["train_accuracy"] and h2["val_accuracy"] == h1["val_accuracy"]
    X = load_cache(digits_cache).embeddings
    np.testing.assert_array_equal(two.head.predict(X), one.head.predict(X))
