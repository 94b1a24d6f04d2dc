"""Calibrations do what they claim on tiny nets."""

from __future__ import annotations

import torch

from models.config.ff_rules.dtp import FFDTPRule
from models.config.ff_rules.pc import FFPCRule
from models.ff.mlp import DeepMLP, MLPConfig, true_state_grads
from models.ff.rules.dfa import DFA, dfa_feedback_scale
from models.ff.rules.dtp import DTP, calibrate_dtp
from models.ff.rules.pc import PC, calibrate_pc

torch.set_num_threads(2)


def setup(depth: int = 3) -> tuple[DeepMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = DeepMLP(MLPConfig(d_in=5, d_out=4, width=12, depth=depth, d_ff=16)).double()
    g = torch.Generator().manual_seed(1)
    return net, torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,),
                                                                                      generator=g)


def test_dfa_scale_matches_bp_rms() -> None:
    net, x, y = setup()
    rule = DFA(net)
    out = dfa_feedback_scale(rule, x, y)
    _, g = true_state_grads(net, x, y)
    cs = rule.credit(x, y)
    mean_ratio = sum(float(t.pow(2).mean().sqrt() / c.pow(2).mean().sqrt())
                     for c, t in zip(cs, g, strict=True)) / len(g)
    assert abs(mean_ratio - 1) < 1e-9 and out["feedback_scale"] == float(rule.scale)


def test_dtp_pretraining_reduces_reconstruction_loss() -> None:
    net, x, y = setup()
    rule = DTP(net, FFDTPRule(inverse_lr=3e-3))
    out = calibrate_dtp(rule, x, y, steps=150, batch_size=32)
    assert out["inverse_rec_end"] < 0.5 * out["inverse_rec_start"]
    assert 0.2 < out["target_ratio"] < 5


def test_pc_calibration_picks_a_step_that_reaches_tolerance() -> None:
    net, x, y = setup()
    rule = PC(net, FFPCRule(precision_lr=0.0, settle_lr=1e-3))  # 1e-3 cannot settle in time
    out = calibrate_pc(rule, x, y)
    _, iters, res = rule.settle(x, y)
    assert res <= rule.cfg.settle_tol and iters < rule.cfg.settle_iters
    assert out["settle_lr"] == rule.cfg.settle_lr > 1e-3
