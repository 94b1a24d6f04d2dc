"""Planted log-004 loss bugs: a term re-wrapped with torch.tensor(python_float) (no gradient
path), an anchor MSE between tensors 10x apart in scale (stuck at ~1e-7), a constant term, and
a metric that flat-lines because the optimiser holds a copy of the parameters."""

from __future__ import annotations

import copy

import pandas as pd
import torch

from models.health import run_all
from models.health.losses import constant_loss_term, dead_loss_term, flat_metric, no_gradient_path
from models.health.recorders import term_grad_norm


def _bridge_run(diversity_bug: bool, anchor_bug: bool, steps: int = 30) -> tuple[pd.DataFrame,
                                                                                 list[str]]:
    torch.manual_seed(0)
    bridge = torch.nn.Linear(8, 8)
    params = list(bridge.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    rows, flagged = [], set()
    for step in range(steps):
        x = torch.randn(16, 8)
        soft = torch.tanh(bridge(x)) * 3e-5  # soft tokens scaled small (the log's +-0.003 regime)
        answer = torch.randn(16, 8) * 3e-4   # target embeddings, 10x larger
        main = torch.nn.functional.mse_loss(bridge(x), x.roll(1, dims=1))
        if anchor_bug:
            anchor = torch.nn.functional.mse_loss(soft, answer)
        else:
            anchor = 1 - torch.nn.functional.cosine_similarity(soft, answer).mean()
        if diversity_bug:
            diversity = soft.round(decimals=5).unique().numel() / soft.numel()  # Python float
            div = -torch.log(torch.tensor(diversity + 1e-8))
        else:
            div = -torch.log(soft.var(dim=0).mean() / 9e-10 + 1e-8)
        terms = {"main": main, "anchor": anchor, "diversity": div}
        row = {"step": step, "loss": sum(terms.values()).item()}
        for name, term in terms.items():
            tg = term_grad_norm(term, params)
            row |= {f"term/{name}": term.item(), f"termgrad/{name}": tg.norm}
            if tg.no_grad_path:
                flagged.add(name)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        rows.append(row)
    return pd.DataFrame(rows), sorted(flagged)


def test_python_float_loss_has_no_gradient_path() -> None:
    trace, flagged = _bridge_run(diversity_bug=True, anchor_bug=False)
    assert flagged == ["diversity"]
    (f,) = no_gradient_path(trace, flagged)
    assert "diversity" in f.message and "termgrad/diversity == 0" in f.message


def test_differentiable_diversity_has_a_path() -> None:
    trace, flagged = _bridge_run(diversity_bug=False, anchor_bug=False)
    assert flagged == [] and no_gradient_path(trace) == []


def test_anchor_mse_with_scale_mismatch_is_dead() -> None:
    trace, _ = _bridge_run(diversity_bug=False, anchor_bug=True)
    assert trace["term/anchor"].max() < 1e-6  # the log's "0.0000 throughout training"
    found = dead_loss_term(trace)
    (f,) = [g for g in found if "term/anchor" in g.message]
    assert f.evidence["ratio"] < 1e-5 and f.evidence["grad_ratio"] < 1e-2


def test_cosine_anchor_is_alive() -> None:
    trace, _ = _bridge_run(diversity_bug=False, anchor_bug=False)
    assert dead_loss_term(trace) == [] and constant_loss_term(trace) == []


def test_constant_term_fires() -> None:
    codebook = torch.randn(4, 8)
    rows = [{"step": s, "term/vq": torch.nn.functional.mse_loss(codebook[0], codebook[1]).item(),
             "term/ce": 2.0 - 0.01 * s} for s in range(10)]
    (f,) = constant_loss_term(pd.DataFrame(rows))
    assert "term/vq" in f.message


def _train(optimiser_on_copy: bool, steps: int = 40) -> pd.DataFrame:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    held = copy.deepcopy(model) if optimiser_on_copy else model  # bug: built for a copy
    opt = torch.optim.SGD(held.parameters(), lr=0.1)
    xv = torch.randn(64, 4)
    rows = []
    for step in range(steps):
        x = torch.randn(32, 4)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(xv), xv.sum(1, keepdim=True))
        rows.append({"step": step, "loss": loss.item(), "val_loss": val.item()})
    return pd.DataFrame(rows)


def test_flat_lined_val_metric_fires() -> None:
    found = flat_metric(_train(optimiser_on_copy=True))
    assert [f.message.split()[0] for f in found] == ["val_loss"]


def test_learning_run_is_not_flat() -> None:
    assert flat_metric(_train(optimiser_on_copy=False)) == []


def test_run_all_sees_the_planted_terms() -> None:
    trace, flagged = _bridge_run(diversity_bug=True, anchor_bug=True)
    names = {f.detector for f in run_all(trace, {"no_grad_path": flagged}, run="bridge/s0")}
    assert {"no_gradient_path", "dead_loss_term"} <= names
