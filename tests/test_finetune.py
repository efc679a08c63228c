"""Stage 3: BatchNorm really frozen, epochs-0 equivalence with the head, bit-exact resume,
provenance checks, and the fine-tuned model used by predict / evaluate / extract."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import load_cache
from pipeline.backbones.registry import load_backbone
from pipeline.errors import IncompatibleError, Interrupted, TrainingDiverged, UsageError
from pipeline.finetune.augment import train_transform
from pipeline.finetune.freezing import backbone_blocks, batchnorm_layers
from pipeline.finetune.model import assemble
from pipeline.finetune.options import resolve_options
from pipeline.finetune.run import checkpoint_path_for, run_finetune
from pipeline.finetune.trainer import Trainer, lr_factor
from pipeline.heads.artifacts import load_head
from pipeline.heads.estimators import build_head_module
from pipeline.images.reader import DecodedBatch

from conftest import ROOT, cli_json, run_cli

FAST = {"batch_size": 8, "augment": "light"}


def _batches(n_batches: int, size: int, n_classes: int, seed: int = 0) -> tuple[list[DecodedBatch], np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    batches, labels = [], []
    for b in range(n_batches):
        images = torch.randn(4, 3, size, size, generator=g)
        batches.append(DecodedBatch(list(range(4 * b, 4 * b + 4)), images, [""] * 4, []))
        labels += [i % n_classes for i in range(4 * b, 4 * b + 4)]
    return batches, np.array(labels)


def _resnet18_model(unfreeze: str = "all", n_classes: int = 3):
    bb = load_backbone("resnet18", "none", seed=0)
    torch.manual_seed(0)
    model, thawed, _ = assemble(bb, build_head_module(bb.embed_dim, n_classes, (), ()), unfreeze, n_classes, seed=0)
    return model, thawed


def test_batchnorm_stays_bit_identical_while_convolutions_train():
    model, _ = _resnet18_model()
    before = copy.deepcopy(model.state_dict())
    batches, labels = _batches(3, 64, 3)
    trainer = Trainer(model, resolve_options({"epochs": 1, "warmup": 0.0, "lr_backbone": 0.05, "clip_grad": 0.0}), torch.device("cpu"), labels)
    stats = trainer.train_epoch(batches, epoch=0, total_epochs=1)
    assert stats.images == 12
    bns = batchnorm_layers(model)
    assert len(bns) == 20 and not any(bn.training for _, bn in bns)  # train() kept them in eval mode
    after = model.state_dict()
    bn_keys = [f"{name}.{k}" for name, bn in bns for k in list(dict(bn.named_parameters())) + list(dict(bn.named_buffers()))]
    assert len(bn_keys) == 20 * 5  # weight, bias, running_mean, running_var, num_batches_tracked
    for key in bn_keys:
        assert torch.equal(before[key], after[key]), key
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(not torch.equal(before[f"{n}.weight"], after[f"{n}.weight"]) for n in convs)
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_the_frozen_batchnorm_check_can_fail():
    """Control: a plain ``model.train()`` loop does move BatchNorm statistics, so the test above means something."""
    bb = load_backbone("resnet18", "none", seed=0)
    net = bb.model.train().requires_grad_(True)
    before = net.bn1.running_mean.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    out = net(torch.randn(4, 3, 64, 64))
    out.sum().backward()
    opt.step()
    assert not torch.equal(before, net.bn1.running_mean)


def test_unfreeze_last_n_trains_only_those_blocks():
    model, thawed = _resnet18_model("last:2")
    assert thawed == ["layer4.0", "layer4.1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.layer4.", "head.")) and ".bn" not in n and "downsample.1" not in n for n in trainable)
    before = copy.deepcopy(model.state_dict())
    batches, labels = _batches(2, 64, 3)
    Trainer(model, resolve_options({"epochs": 1, "warmup": 0.0, "lr_backbone": 0.05}), torch.device("cpu"), labels).train_epoch(batches, 0, 1)
    after = model.state_dict()
    assert torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert torch.equal(before["backbone.layer3.1.conv2.weight"], after["backbone.layer3.1.conv2.weight"])
    assert not torch.equal(before["backbone.layer4.1.conv2.weight"], after["backbone.layer4.1.conv2.weight"])
    assert not any(m.training for m in (*model.backbone.layer3[1].modules(), model.backbone.conv1))  # frozen blocks behave as at extraction
    assert model.backbone.layer4[1].conv1.training
    with pytest.raises(UsageError, match="only 9 blocks"):
        _resnet18_model("last:10")
    with pytest.raises(UsageError, match="last:N"):
        _resnet18_model("top3")


@pytest.mark.parametrize("name, first, last", [("resnet50", "conv1", "layer4.2"), ("vit_b_16", "class_token", "encoder.ln"),
                                               ("densenet121", "features.conv0", "features.denseblock4")])
def test_backbone_blocks_follow_the_architecture(name, first, last):
    import torchvision

    from pipeline.backbones.registry import make_headless

    model = torchvision.models.get_model(name, weights=None)
    make_headless(model, 1000)
    names = [n for n, _ in backbone_blocks(model)]
    assert names[0] == first and names[-1] == last
    covered = {id(p) for _, ps in backbone_blocks(model) for _, p in ps}
    bn = {id(p) for _, m in batchnorm_layers(model) for p in m.parameters()}
    assert {id(p) for p in model.parameters()} - bn == covered  # every non-BN parameter in exactly one block


def test_inception_trains_with_its_auxiliary_output():
    bb = load_backbone("inception_v3", "none", seed=0)
    model, _, aux = assemble(bb, build_head_module(bb.embed_dim, 3, (), ()), "all", 3, seed=0)
    assert aux and model.backbone.AuxLogits.fc.out_features == 3
    model.train()
    x = torch.randn(2, 3, 299, 299)
    logits, aux_logits = model(x)
    assert logits.shape == (2, 3) and aux_logits.shape == (2, 3)
    model.eval()
    with torch.inference_mode():
        assert model(x).shape == (2, 3)  # evaluation uses the main output only
    calls = []
    trainer = Trainer(model, resolve_options({"epochs": 1}), torch.device("cpu"), np.array([0, 1]))
    crit = trainer.criterion
    trainer.criterion = lambda z, y: calls.append(z.shape) or crit(z, y)
    trainer.train_epoch([DecodedBatch([0, 1], x, ["", ""], [])], 0, 1)
    assert len(calls) == 2  # main + aux loss (weighted 0.4)


def test_lr_schedule_by_hand():
    # 10 steps, 20% warmup: steps 0,1 ramp to 1/2, 2/2; then cosine over the remaining 8
    assert [lr_factor(s, 10, "cosine", 0.2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, "cosine", 0.2) == pytest.approx(1.0)
    assert lr_factor(6, 10, "cosine", 0.2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(9, 10, "step", 0.0) == pytest.approx(0.01) and lr_factor(0, 10, "step", 0.0) == 1.0
    assert lr_factor(5, 10, "constant", 0.0) == 1.0


def test_train_transform_uses_the_models_size_and_normalisation():
    from pipeline.backbones.registry import Preprocessing

    pre = Preprocessing(resize_size=[342], crop_size=[299], mean=[0.5] * 3, std=[0.5] * 3)
    from PIL import Image

    img = Image.new("RGB", (400, 300), (255, 255, 255))
    for preset in ("light", "basic", "rotate", "strong"):
        out = train_transform(pre, preset)(img)
        assert out.shape == (3, 299, 299) and out.dtype == torch.float32
    assert torch.allclose(train_transform(pre, "basic")(img), torch.ones(3, 299, 299))  # white -> (1 - .5) / .5


def test_epochs_zero_equals_the_heads_accuracy(digits_small, tmp_path):
    """The assembled resnet18 + logreg head scores the val images exactly as the head scored the cache."""
    from pipeline.extract import run_extract
    from pipeline.heads.fit import fit_head

    cache = tmp_path / "c.h5"
    run_extract(digits_small, "resnet18", "none", cache, workers=0)
    for kind in ("logreg", "mlp"):
        head = Path(fit_head(cache, kind, tmp_path / f"h.{kind}.head.pt", plots=False).head_path)
        r = run_finetune(head, tmp_path / f"ft0.{kind}.pt", options={"epochs": 0}, workers=0, plots=False)
        expected = load_head(head).metrics["val"]
        assert r.metrics["val"]["n"] == expected["n"] > 0
        assert r.metrics["val"]["accuracy"] == expected["accuracy"]
        assert r.metrics["val"]["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-3)
        # the saved model holds the unchanged backbone: its weights identity differs, its embeddings do not
        ft = load_head(r.model_path)
        assert ft.provenance["weights"].startswith("finetuned:sha256=") and ft.provenance["base_weights"] == "none"


def test_resume_after_sigkill_is_bit_for_bit(tiny_head, tmp_path):
    """Train 3 epochs; separately train, SIGKILL during epoch 2, resume with another thread count
    at hand: the same weights, exactly (the resume uses the checkpoint's count)."""
    common = ("--epochs", "3", "--batch-size", "8", "--augment", "basic", "--workers", "0", "-q", "--trust-hub")  # tiny_head names a hub: backbone
    ref = tmp_path / "ref.pt"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # in-process runs use this process's count; the killed run gets the same
    try:
        assert run_cli("finetune", str(tiny_head), "--out", str(ref), *common).returncode == 0

        out = tmp_path / "killed.pt"
        ckpt = checkpoint_path_for(out)
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "finetune", str(tiny_head), "--out", str(out), *common], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        deadline = time.monotonic() + 300
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        proc.kill()
        proc.wait()
        state = torch.load(ckpt, weights_only=True)
        assert state["epoch"] == 1 and state["threads"] == 2  # the kill came during epoch 2; epoch 1's checkpoint is intact

        torch.set_num_threads(1)  # a busier machine at resume time: one thread would round differently
        resumed = run_cli("finetune", str(tiny_head), "--out", str(out), "--resume", "--workers", "0", "--json", "--trust-hub")
    finally:
        torch.set_num_threads(before)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == 1 and summary["epochs_done"] == 3
    a, b = torch.load(checkpoint_path_for(ref), weights_only=True), torch.load(ckpt, weights_only=True)
    assert b["threads"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_resume_with_two_workers_equals_in_process(tiny_head, tmp_path):
    """Augmentation is seeded per image, so decoder processes do not change the result."""
    a = run_finetune(tiny_head, tmp_path / "a.pt", options={**FAST, "epochs": 1}, workers=0, plots=False, trust_hub=True)
    b = run_finetune(tiny_head, tmp_path / "b.pt", options={**FAST, "epochs": 1}, workers=2, plots=False, trust_hub=True)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]


def test_bf16_training_where_native_reaches_fp32_accuracy(tiny_head, tmp_path, said):
    """--precision bf16 trains under bf16 autocast where the CPU runs it natively (else fp32, said
    once): the model records what it trained in, its losses differ from fp32's (it really ran in
    bf16), and validation accuracy matches fp32's within noise."""
    from pipeline.backbones.hardware import choose_precision
    from pipeline.heads import load_head

    opts = {**FAST, "epochs": 2}
    exact = run_finetune(tiny_head, tmp_path / "fp32.pt", options=opts, workers=0, plots=False, trust_hub=True)
    rounded = run_finetune(tiny_head, tmp_path / "bf16.pt", options={**opts, "precision": "bf16"}, workers=0, plots=False, trust_hub=True)
    expected = choose_precision("bf16", torch.device("cpu"))
    assert load_head(tmp_path / "bf16.pt").provenance["trained_in"] == expected.name
    assert load_head(tmp_path / "fp32.pt").provenance["trained_in"] == "fp32"
    assert any(m.startswith(expected.note) for m in said), said
    if expected.name == "bf16":
        assert [h["train_loss"] for h in exact.history] != [h["train_loss"] for h in rounded.history]
    assert abs(exact.metrics["val"]["accuracy"] - rounded.metrics["val"]["accuracy"]) <= 0.15
    assert math.isfinite(rounded.history[-1]["train_loss"])


def test_bf16_on_a_cpu_without_it_says_so_and_trains_in_fp32(tiny_head, tmp_path, monkeypatch, said):
    from pipeline.backbones import hardware
    from pipeline.heads import load_head

    monkeypatch.setattr(hardware, "native_bf16", lambda device: (False, "CPU has neither AMX nor AVX-512 BF16"))
    opts = {**FAST, "epochs": 1}
    exact = run_finetune(tiny_head, tmp_path / "fp32.pt", options=opts, workers=0, plots=False, trust_hub=True)
    asked = run_finetune(tiny_head, tmp_path / "asked.pt", options={**opts, "precision": "bf16"}, workers=0, plots=False, trust_hub=True)
    assert any("--precision bf16 refused: CPU has neither AMX nor AVX-512 BF16; running in exact fp32 instead" in m for m in said), said
    assert load_head(tmp_path / "asked.pt").provenance["trained_in"] == "fp32"
    assert [h["train_loss"] for h in asked.history] == [h["train_loss"] for h in exact.history]


def test_a_bf16_checkpoint_resumes_bit_identically(tiny_head, tmp_path, monkeypatch):
    """Two bf16 epochs straight, or interrupted after epoch 1's checkpoint and resumed: the same weights, exactly."""
    import pipeline.finetune.run as run_mod

    opts = {**FAST, "precision": "bf16", "epochs": 2}
    straight = tmp_path / "straight.pt"
    run_finetune(tiny_head, straight, options=opts, workers=0, plots=False, trust_hub=True)
    real = run_mod._save_checkpoint

    def then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as Ctrl-C right after epoch 1's checkpoint

    monkeypatch.setattr(run_mod, "_save_checkpoint", then_interrupt)
    resumed = tmp_path / "resumed.pt"
    with pytest.raises(Interrupted):
        run_finetune(tiny_head, resumed, options=opts, workers=0, plots=False, trust_hub=True)
    monkeypatch.setattr(run_mod, "_save_checkpoint", real)
    run_finetune(tiny_head, resumed, resume=True, workers=0, plots=False, trust_hub=True)
    a, b = torch.load(checkpoint_path_for(straight), weights_only=True), torch.load(checkpoint_path_for(resumed), weights_only=True)
    assert b["options"]["precision"] == "bf16" and b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_checkpoint_guards_and_option_conflicts(tiny_head, tmp_path):
    out = tmp_path / "m.pt"
    run_finetune(tiny_head, out, options={**FAST, "epochs": 1}, workers=0, plots=False, trust_hub=True)
    again = run_cli("finetune", str(tiny_head), "--out", str(out), "--epochs", "1")
    assert again.returncode == 2 and "--resume" in again.stderr and "--force" in again.stderr
    conflict = run_cli("finetune", str(tiny_head), "--out", str(out), "--resume", "--lr-head", "0.5")
    assert conflict.returncode == 2 and "--lr-head" in conflict.stderr and "differs" in conflict.stderr
    more = run_finetune(tiny_head, out, options={"epochs": 2}, resume=True, workers=0, plots=False, trust_hub=True)  # more epochs may be asked for
    assert more.epochs_done == 2 and more.options["batch_size"] == 8  # the rest comes from the checkpoint
    with pytest.raises(UsageError, match="no checkpoint"):
        run_finetune(tiny_head, tmp_path / "other.pt", resume=True)


def test_divergence_is_a_clear_error(tiny_head, tmp_path):
    with pytest.raises(TrainingDiverged, match="lower --lr-backbone"):
        run_finetune(tiny_head, tmp_path / "d.pt", options={**FAST, "epochs": 1, "lr_head": 1e12, "lr_backbone": 1e12, "clip_grad": 0.0}, workers=0, plots=False,
                     trust_hub=True)


def test_finetuned_model_works_with_predict_extract_and_evaluate(tiny_head, tiny_hub, tmp_path):
    out = tmp_path / "ft.pt"
    r = cli_json("finetune", str(tiny_head), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--workers", "0", "--trust-hub")
    assert r["exit_code"] == 0 and Path(r["model_path"]) == out and r["n_val"] > 0
    assert [h["epoch"] for h in r["history"]] == [1, 2] and {"train_loss", "val_accuracy", "lr_head", "seconds"} <= set(r["history"][0])
    for name in ("metrics_json", "history_png", "confusion_val_png"):
        assert Path(r["reports"][name]).is_file()
    assert json.loads(out.with_name("ft.history.json").read_text())[-1]["epoch"] == 2

    data = Path(load_head(tiny_head).provenance["data_root"])
    cache = tmp_path / "ft.h5"
    ex = cli_json("extract", str(data), "--model", str(out), "--out", str(cache), "--workers", "0", "--trust-hub")
    assert ex["new"] > 0 and ex["weights"].startswith("finetuned:sha256=")
    # the cache rows are the fine-tuned backbone's own outputs
    from pipeline.images.decode import load_image

    loaded = load_head(out)
    bb = load_backbone(loaded.provenance["model"], str(out))
    c = load_cache(cache)
    with torch.inference_mode():
        x = bb.preprocessing.transform()(load_image(data / c.paths[0])).unsqueeze(0)
        np.testing.assert_allclose(bb.model(x).numpy()[0], c.embeddings[0], rtol=1e-4, atol=1e-5)

    ev = cli_json("evaluate", str(out), "--cache", str(cache))
    best = r["metrics"]["val"]
    assert ev["val"]["n"] == best["n"] and abs(ev["val"]["accuracy"] - best["accuracy"]) <= 1 / best["n"]
    wrong = run_cli("evaluate", str(out), "--cache", str(Path(tiny_head).with_name("tiny.h5")))
    assert wrong.returncode == 5 and "weights" in wrong.stderr

    pred = cli_json("predict", str(out), str(data / "digit_1"), "--out", str(tmp_path / "p.csv"), "--trust-hub")
    assert len(pred["predictions"]) == 10 and Path(pred["csv"]).is_file()


def test_head_backbone_mismatch_is_refused(tiny_hub, tmp_path):
    """A head fitted on one weights file refuses to fine-tune once that file holds other weights."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.heads.fit import fit_head

    data = write_digits(tmp_path / "d", size=32, per_class=4)
    weights = tmp_path / "w.pt"
    torch.save(load_backbone(tiny_hub, "none", seed=1).model.state_dict(), weights)
    run_extract(data, tiny_hub, str(weights), tmp_path / "c.h5", workers=0)
    head = fit_head(tmp_path / "c.h5", "logreg", tmp_path / "h.head.pt", plots=False).head_path
    torch.save(load_backbone(tiny_hub, "none", seed=2).model.state_dict(), weights)  # someone replaced the file
    proc = run_cli("finetune", head, "--epochs", "1", "--trust-hub")
    assert proc.returncode == 5 and "weights" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(IncompatibleError, match="classes"):
        other = tmp_path / "other"
        for cls in ("x", "y"):
            write_digits(other / cls, size=32, per_class=1)
        run_finetune(head, tmp_path / "o.pt", data_dir=other, options={"epochs": 1}, workers=0)


@pytest.mark.parametrize("args, code, needle", [
    (["--unfreeze", "top"], 2, "--unfreeze"),
    (["--augment", "wild"], 2, "--augment"),
    (["--optimizer", "lion"], 2, "--optimizer"),
    (["--amp"], 2, "CUDA"),
    (["--amp", "--precision", "bf16"], 2, "--amp and --precision were both given"),
    (["--precision", "int8"], 2, "--precision 'int8'"),
    (["--epochs", "-1"], 2, "--epochs"),
])
def test_cli_bad_finetune_options(tiny_head, tmp_path, args, code, needle):
    if args == ["--amp"] and torch.cuda.is_available():
        pytest.skip("--amp is valid where CUDA exists")
    proc = run_cli("finetune", str(tiny_head), "--out", str(tmp_path / "x.pt"), *args)
    assert proc.returncode == code and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_not_a_head(tmp_path):
    bogus = tmp_path / "h.pt"
    torch.save({"x": torch.zeros(1)}, bogus)
    proc = run_cli("finetune", str(bogus))
    assert proc.returncode == 5 and "not a featcache head" in proc.stderr


def test_sigterm_during_training_exits_130_keeping_the_checkpoint(tiny_head, tmp_path):
    out = tmp_path / "t.pt"
    ckpt = checkpoint_path_for(out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "finetune", str(tiny_head), "--out", str(out), "--epochs", "50",
                             "--batch-size", "8", "--workers", "0", "-q", "--trust-hub"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1


def test_demo_runs_every_stage_and_predicts_only_held_out_images(tiny_hub, tmp_path):
    """The README's demo (with a tiny backbone so it takes seconds): extract -> fit-head -> finetune -> predict,
    where the predicted images are from the test split, which no stage trained on, and every file it wrote is listed."""
    import csv

    r = cli_json("demo", "--workdir", str(tmp_path / "demo"), "--model", tiny_hub)
    digits = tmp_path / "demo" / "digits"
    n_train = sum(1 for _ in (digits / "train").rglob("*.png"))
    assert r["extract"]["new"] == 1797 and r["fit_head"]["metrics"]["val"]["accuracy"] > 0.5
    assert r["fit_head"]["metrics"]["test"]["n"] == sum(1 for _ in (digits / "test").rglob("*.png"))
    assert r["finetune"]["epochs_done"] == 1 and Path(r["finetune"]["model_path"]).is_file()
    assert r["finetune"]["n_train"] == n_train and "fine-tuning" in r["finetune_verdict"]
    assert r["predict"]["n"] == 20 and Path(r["predict"]["grid"]).is_file()
    with open(r["predict"]["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20 and all(Path(row["path"]).parent.parent == digits / "test" for row in rows)
    listed = [f["path"] for f in r["files"]]
    assert {r["predict"]["csv"], r["predict"]["grid"], r["finetune"]["model_path"], r["fit_head"]["head"]} <= set(listed)
    assert all(Path(p).exists() for p in listed if "{" not in p)
    assert r["report"]["path"] == str(tmp_path / "demo" / "report.html") in listed and r["report"]["thumbnails"] > 0  # the README's report


def test_gradient_accumulation_equals_one_big_batch(tiny_hub):
    """accum 2 x batch 4 takes the same optimiser step as batch 8 (BatchNorm is frozen, so
    batch statistics cannot differ; the linear head has no dropout)."""
    batches, labels = _batches(2, 32, 3, seed=3)
    big = [DecodedBatch(list(range(8)), torch.cat([b.images for b in batches]), [""] * 8, [])]
    results = []
    for feed, accum in ((batches, 2), (big, 1)):
        bb = load_backbone(tiny_hub, "none", seed=0)
        torch.manual_seed(0)
        model, _, _ = assemble(bb, build_head_module(bb.embed_dim, 3, (), ()), "all", 3, seed=0)
        opts = resolve_options({"epochs": 1, "accum": accum, "warmup": 0.0, "clip_grad": 0.0, "momentum": 0.0, "lr_backbone": 0.1})
        Trainer(model, opts, torch.device("cpu"), labels).train_epoch(feed, 0, 1)
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0]["backbone.stem.0.weight"], load_backbone(tiny_hub, "none", seed=0).model.state_dict()["stem.0.weight"])


def test_never_trains_on_the_heads_validation_images(tiny_head, tmp_path):
    from pipeline.finetune.run import FineTuneJob
    from pipeline.heads.fit import _load_split

    loaded = load_head(tiny_head)
    job = FineTuneJob(loaded, tmp_path / "m.pt", None, {"epochs": 1}, False, False, 0, torch.device("cpu"), trust_hub=True)
    table, split, _ = _load_split(Path(loaded.provenance["cache"]), 0.2, 0)
    head_val = {p for p, s in zip(table.paths, split) if s == "val"}
    train = {r.relpath for r in job.train_set.records}
    assert head_val and not train & head_val
    assert {job.scan.records[i].relpath for i in job.index["val"]} == head_val


def test_non_finite_outputs_are_a_clear_error_not_a_crash(tiny_head, tmp_path, monkeypatch):
    from pipeline.finetune.run import FineTuneJob

    real = FineTuneJob._score

    def poisoned(self, records):
        proba, pos, bad = real(self, records)
        proba[0] = np.nan
        return proba, pos, bad

    monkeypatch.setattr(FineTuneJob, "_score", poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf for 1 of \d+ val images"):
        run_finetune(tiny_head, tmp_path / "n.pt", options={"epochs": 0}, workers=0, plots=False, trust_hub=True)
