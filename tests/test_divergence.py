"""Divergence is loud: a torch head, a grid member or a fine-tune whose loss blows up stops with
one line naming the learning rate to lower (exit 7), keeps what was saved before, and a job
records the step as failed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.divergence import DivergenceGuard, chance_loss
from pipeline.errors import ExitCode, TrainingDivergedError
from pipeline.finetune.run import checkpoint_path_for, load_checkpoint, run_finetune
from pipeline.heads.estimators import ArraySource, LinearHead, MLPHead
from pipeline.heads.grid import fit_grid, grid_members

from conftest import run_cli

FAST = {"batch_size": 8, "augment": "light", "clip_grad": 0.0}


@pytest.fixture(scope="module")
def blobs():
    """Three separable classes in 32 dimensions: any sane head learns them."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    X = rng.normal(size=(300, 32)).astype(np.float32)
    X[:, 0] += 3 * y
    return X, y


def test_the_rule():
    g = DivergenceGuard.starting_at(0.01, n_classes=10)  # a near-perfect start is measured from chance level
    assert g.reference == pytest.approx(chance_loss(10)) and g.limit == pytest.approx(100 * math.log(10))
    assert g.problem(2.0) is None and g.problem(200.0) is None
    assert g.problem(50658.0).startswith("grew to 5.066e+04")
    assert g.problem(float("nan")) == "became nan" and g.problem(float("inf")) == "became inf"
    assert DivergenceGuard(0.05).limit == pytest.approx(10.05)  # small references: +10, not x100


@pytest.mark.parametrize("cls", [LinearHead, MLPHead])
def test_a_torch_head_with_an_absurd_lr_stops_and_names_lr(blobs, cls):
    X, y = blobs
    with pytest.raises(TrainingDivergedError, match=r"training diverged: .*--lr is 1e\+06 now") as err:
        cls(lr=1e6, weight_decay=0.0, epochs=5, device="cpu").fit(X, y)
    assert err.value.exit_code == ExitCode.DIVERGED == 7 and "\n" not in str(err.value)


def test_a_nan_stops_the_head_at_once(blobs, monkeypatch):
    """A NaN batch stops training there, not after an epoch (or 100 epochs) of NaNs."""
    X, y = blobs
    calls = []
    real = LinearHead.train_step

    def poisoned(self, xb, yb, *share):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real(self, xb, yb, *share)

    monkeypatch.setattr(LinearHead, "train_step", poisoned)
    with pytest.raises(TrainingDivergedError, match="became nan in epoch 1"):
        LinearHead(batch_size=16, epochs=5, device="cpu").fit(X, y)
    assert len(calls) == 3


def test_sane_and_noisy_heads_do_not_trip(blobs):
    X, y = blobs
    for head in (LinearHead(epochs=20, device="cpu"), MLPHead(epochs=20, device="cpu"), LinearHead(lr=1.0, weight_decay=0.0, epochs=20, device="cpu")):
        head.fit(X, y)  # lr=1 starts with a loss ~3x chance, then comes down: not divergence
        losses = [r["train_loss"] for r in head.history_]
        assert losses[-1] < losses[0] and head.score(X, y) > 0.5, losses  # (chance: 0.33)


def test_grid_drops_a_diverging_member_and_keeps_the_sane_one(blobs, caplog):
    X, y = blobs
    template = LinearHead(epochs=8, patience=3, device="cpu")
    fit = lambda lrs: fit_grid(template, grid_members(lrs, (0.0,), ((),)), ArraySource(X[:240], y[:240]), ArraySource(X[240:], y[240:]),  # noqa: E731
                               np.unique(y), X.shape[1], y[:240])
    with caplog.at_level("WARNING", logger="pipeline"):
        head, board = fit((1e6, 0.1))
    alone, _ = fit((0.1,))  # the sane member, trained without its diverging sibling
    assert head.lr == 0.1 and head.score(X, y) > 0.8
    np.testing.assert_allclose(head.predict_proba(X), alone.predict_proba(X), rtol=1e-5, atol=1e-6)
    assert board[0]["lr"] == 0.1 and board[0]["diverged"] is None
    assert board[-1]["lr"] == 1e6 and board[-1]["diverged"] and board[-1]["val_loss"] is None
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "1 of 2 heads diverged" in warning and "lr=1e+06" in warning


def test_grid_where_every_member_diverges_is_an_error(blobs):
    X, y = blobs
    members = grid_members((1e6, 1e5), (0.0, 1e-4), ((),))
    with pytest.raises(TrainingDivergedError, match=r"every head of the grid diverged .*--lr is 1e\+06,100000 now"):
        fit_grid(LinearHead(epochs=4, device="cpu"), members, ArraySource(X[:240], y[:240]), ArraySource(X[240:], y[240:]), np.unique(y),
                 X.shape[1], y[:240])


def test_cli_fit_head_with_an_absurd_lr_exits_7(tiny_head, tmp_path):
    cache = tiny_head.parent / "tiny.h5"
    out = tmp_path / "lin.head.pt"
    proc = run_cli("fit-head", str(cache), "--clf", "linear", "--lr", "1e6", "--weight-decay", "0", "--out", str(out))
    assert proc.returncode == 7, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged") and "--lr is 1e+06" in lines[0], proc.stderr
    assert not out.exists()


def test_finetune_with_absurd_lrs_exits_7_and_saves_nothing_diverged(tiny_head, tmp_path):
    out = tmp_path / "d.pt"
    with pytest.raises(TrainingDivergedError, match=r"lower --lr-backbone/--lr-head \(now 1e\+12/1e\+12; job file") as err:
        run_finetune(tiny_head, out, options={**FAST, "epochs": 1, "lr_head": 1e12, "lr_backbone": 1e12}, workers=0, plots=False, trust_hub=True)
    assert err.value.exit_code == 7 and "\n" not in str(err.value)
    assert not checkpoint_path_for(out).exists()  # no epoch finished: no checkpoint
    if out.exists():  # only the model as assembled (epoch 0), never diverged weights
        blob = torch.load(out, weights_only=False)
        assert blob["provenance"]["epoch"] == 0


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tiny_head, tmp_path, monkeypatch):
    """Epoch 1 trains normally; epoch 2's learning rates jump: the checkpoint and model of epoch 1 stay."""
    import pipeline.finetune.trainer as ft

    real = ft.Trainer.train_epoch

    def jump_in_epoch_2(self, loader, epoch, total_epochs, progress=None):
        if epoch == 1:
            for g in self.optimizer.param_groups:
                g["initial_lr"] = 1e12
        return real(self, loader, epoch, total_epochs, progress)

    monkeypatch.setattr(ft.Trainer, "train_epoch", jump_in_epoch_2)
    out = tmp_path / "late.pt"
    with pytest.raises(TrainingDivergedError, match="start over with --force; nothing of the diverged epoch was saved: the checkpoint of epoch 1 is intact"):
        run_finetune(tiny_head, out, options={**FAST, "clip_grad": 1.0, "epochs": 2}, workers=0, plots=False, trust_hub=True)  # clipped, epoch 1 trains; 1e12 still diverges
    ckpt = load_checkpoint(checkpoint_path_for(out))
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    model = torch.load(out, weights_only=False)
    assert model["provenance"]["epoch"] in (0, 1)
    tensors = [v for part in ("backbone_state", "head") for v in _tensors(model.get(part))]
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    history = json.loads(out.with_name("late.history.json").read_text())
    assert [h["epoch"] for h in history] == [1]


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []
