"""Node perturbation, the README's worked example of adding a rule: its defining equation on a tiny
net, its unbiasedness, a params row of it running through a study, and that adding it retrained
no existing run (the other rows' code identity is the same with and without its two modules)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.config import validate_params
from models.config.ff_rules.node_perturbation import FFNodePerturbationRule
from models.context import RunContext
from models.ff.mlp import DeepMLP, MLPConfig, true_state_grads
from models.ff.rules import KINDS, rule_class
from models.ff.rules.node_perturbation import NodePerturbation
from models.identity import ROOT, code_hash, stage_code
from models.paths import RunSpec
from models.studies import get_study

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0) -> tuple[DeepMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = DeepMLP(MLPConfig(d_in=5, d_out=3, width=8, depth=2, d_ff=16)).double()
    return net, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


def test_credit_is_the_central_difference_along_the_drawn_direction() -> None:
    """c_lb = ((l_b(h + s eps) - l_b(h - s eps)) / 2s) eps_b / B -> (dL/dh_lb . eps_b) eps_b."""
    net, x, y = tiny()
    rule = NodePerturbation(net, FFNodePerturbationRule(sigma=1e-5), seed=3)
    _, true = true_state_grads(net, x, y)
    with torch.no_grad():
        hs = net.states(x)
    state = rule.gen.get_state()
    credits = rule.credits_from(hs, y)
    rule.gen.set_state(state)  # the same directions again, in the same order
    for c, g, h in zip(credits, true, hs, strict=True):
        eps = rule.randn(*h.shape)
        expect = (g * eps).sum(-1, keepdim=True) * eps
        assert torch.allclose(c, expect, rtol=1e-6, atol=1e-10)


def test_credit_is_unbiased_for_bp_credit() -> None:
    net, x, y = tiny(1)
    rule = NodePerturbation(net, FFNodePerturbationRule(sigma=1e-4, directions=4000), seed=0)
    _, true = true_state_grads(net, x, y)
    for c, g in zip(rule.credit(x, y), true, strict=True):
        cos = torch.nn.functional.cosine_similarity(c.flatten(), g.flatten(), dim=0)
        assert cos > 0.97, float(cos)
    one = NodePerturbation(net, FFNodePerturbationRule(sigma=1e-4), seed=0).credit(x, y)
    cos1 = torch.nn.functional.cosine_similarity(one[0].flatten(), true[0].flatten(), dim=0)
    assert cos1 < 0.9  # one direction is a noisy estimate: averaging is what made it exact


def test_a_params_row_of_it_trains_through_the_study() -> None:
    assert "node_perturbation" in KINDS and rule_class("node_perturbation") is NodePerturbation
    params = validate_params({"seeds": [0], "studies": {"rules_lq": {
        "rows": ["np"], "epochs": 2, "model": {"depth": 2, "d": 8},
        "train": {"batch_size": 16, "lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0,
                  "log_every": 2, "eval_every": 4, "eval_batches": 1},
        "task": {"d_in": 4, "d_out": 3, "n_train": 64, "n_test": 32},
        "rules": {"np": {"kind": "node_perturbation", "sigma": 1e-3}}}}})
    study, cpu = get_study("rules_lq"), RunContext(torch.device("cpu"))
    cal = study.calibrate(params, "np", cpu)
    trainer = study.build_trainer(params, RunSpec("rules_lq", "np", 0), cal, cpu)
    stats = [trainer.train_step(s, 1e-2) for s in range(4)]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)


def test_adding_the_rule_retrained_no_existing_run(tmp_path: Path) -> None:
    """The rows of every other kind hash the same code whether or not the rule exists."""
    for pkg in ("models", "stages"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "models/ff/rules/node_perturbation.py").unlink()
    (tmp_path / "models/config/ff_rules/node_perturbation.py").unlink()
    others = [k for k in KINDS if k != "node_perturbation"]
    for study in ("rules_vision", "rules_lq", "rules_ladder"):
        for stage in ("calibrate", "train", "diagnose"):
            for kind in others:
                with_it = code_hash(stage_code(stage, study, (kind,)), ROOT)
                without = code_hash(stage_code(stage, study, (kind,), tmp_path), tmp_path)
                assert with_it == without, (study, stage, kind)
