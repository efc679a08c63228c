"""Many torch heads in one read: each member of a grid is the head a separate fit with the
same seed would give (same init, same batches, same AdamW), and the best on val is kept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.heads import FitOptions, fit_head
from pipeline.heads.estimators import ArraySource, LinearHead, MLPHead
from pipeline.heads.grid import BatchedAdamW, fit_grid, grid_members

from conftest import cli_json


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


def test_batched_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 4))]
    lrs, wds = torch.tensor([1e-3, 1e-2, 3e-2]), torch.tensor([0.0, 1e-4, 1e-1])
    refs = [[torch.nn.Parameter(p[g].detach().clone()) for p in params] for g in range(3)]
    ours = BatchedAdamW(params, lrs, wds)
    theirs = [torch.optim.AdamW(refs[g], lr=float(lrs[g]), weight_decay=float(wds[g])) for g in range(3)]
    for _step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        ours.step(0.5, torch.ones(3))
        for g in range(3):
            for p, gr in zip(refs[g], grads):
                p.grad = gr[g].clone()
            for group in theirs[g].param_groups:
                group["lr"] = float(lrs[g]) * 0.5
            theirs[g].step()
    for g in range(3):
        for p, r in zip(params, refs[g]):
            torch.testing.assert_close(p[g], r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("template, hiddens", [
    (LinearHead(epochs=6, patience=3, batch_size=64, device="cpu"), ((),)),
    (MLPHead(hidden=(32,), dropout=(0.0,), epochs=4, patience=2, device="cpu"), ((32,), (16, 8))),
])
def test_grid_members_equal_separately_trained_heads(digits, template, hiddens):
    Xtr, Xte, ytr, yte = digits
    members = grid_members((1e-3, 1e-2), (0.0, 1e-2), hiddens)
    head, board = fit_grid(template, members, ArraySource(Xtr, ytr), ArraySource(Xte, yte), np.unique(ytr), Xtr.shape[1], ytr)
    assert len(board) == len(members) and [r["rank"] for r in board] == list(range(1, len(members) + 1))
    separate = {}
    for m in members:
        alone = type(template)(**{**template.get_params(), "lr": m.lr, "weight_decay": m.weight_decay, "hidden": m.hidden}).fit(Xtr, ytr, Xte, yte)
        separate[m.name()] = alone
        row = next(r for r in board if r["name"] == m.name())
        assert row["val_loss"] == pytest.approx(min(h["val_loss"] for h in alone.history_), rel=1e-4), m.name()
        assert row["epochs"] == len(alone.history_), m.name()
    best = separate[board[0]["name"]]
    assert board[0]["val_loss"] == min(r["val_loss"] for r in board)
    for (name, ours), theirs in zip(head.module_.state_dict().items(), best.module_.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)
    np.testing.assert_array_equal(head.predict(Xte), best.predict(Xte))


def test_fit_head_grid_keeps_the_best_and_writes_the_leaderboard(digits_cache, tmp_path):
    r = fit_head(digits_cache, FitOptions(clf="linear", lr=(1e-3, 1e-2), weight_decay=(0.0, 1e-3), epochs=3), tmp_path / "g.pt")
    board = r.metrics["grid"]
    assert len(board) == 4 and board[0]["val_loss"] == min(b["val_loss"] for b in board)
    assert r.params["lr"] == board[0]["lr"] and r.params["weight_decay"] == board[0]["weight_decay"]
    assert (tmp_path / "g.grid.png").is_file()
    saved = json.loads((tmp_path / "g.metrics.json").read_text())["metrics"]["grid"]
    assert [b["name"] for b in saved] == [b["name"] for b in board]


def test_cli_grid_lists(digits_cache, tmp_path):
    out = cli_json("fit-head", str(digits_cache), "--clf", "mlp", "--hidden", "16:8", "--lr", "1e-3,1e-2", "--epochs", "2",
                   "--out", str(tmp_path / "m.pt"))
    assert out["metrics"]["grid"] and len(out["metrics"]["grid"]) == 4
    assert {tuple(b["hidden"]) for b in out["metrics"]["grid"]} == {(16,), (8,)}


def test_grid_lists_are_refused_for_logreg():
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="torch heads"):
        FitOptions(clf="logreg", lr=(1e-3, 1e-2))
    assert FitOptions(clf="linear", lr=0.01).lr == (0.01,) and FitOptions(clf="mlp", hidden=[512, 256]).hidden == ((512, 256),)
