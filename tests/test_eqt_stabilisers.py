"""jacreg / controller / resreg / validity gate / calibration / abscissa on a tiny float64 block."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp

from models.config.eqt import EPRule, NudgeConfig, StabiliserConfig
from models.eqt.calibration import calibrate
from models.eqt.diagnostics import fingerprint, numerical_abscissa, self_coherence
from models.eqt.model import EqShape, EquilibriumLM
from models.eqt.relax import RelaxConfig
from models.eqt.stabilisers import (
    JacregController,
    jacobian_penalty,
    residual_penalty,
)
from models.eqt.step import gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int = 0, relax_cfg: RelaxConfig | None = None,
         damping: float = 1.0) -> tuple[EquilibriumLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = relax_cfg or RelaxConfig(eps=0.2, t1=100, t1max=1000, res_target=1e-10)
    model = EquilibriumLM(EqShape(11, 6, n_embd=8, n_head=2, init_std=0.3, damping=damping),
                          cfg).double()
    return model, torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))


def test_controller_floor_clip_and_state_dict() -> None:
    ctl = JacregController(lam=0.5, floor=0.1, lam_max=4.0, target=1e-3, ema=0.5)
    for _ in range(200):  # a perfectly converged residual keeps pulling lambda down
        ctl.update(0.0)
        assert ctl.lam >= 0.1
    assert ctl.lam == pytest.approx(0.1)
    for _ in range(200):
        ctl.update(1.0)
        assert ctl.lam <= 4.0
    assert ctl.lam == pytest.approx(4.0)
    ctl.update(0.5e-3)
    other = JacregController(lam=0.5, floor=0.1, lam_max=4.0, target=1e-3, ema=0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    assert other.update(2e-3) == ctl.update(2e-3)
    ctl.update(math.nan)
    assert ctl.lam == 4.0
    with pytest.raises(ValueError, match="floor"):
        JacregController(floor=0.0)


def test_controller_rule_is_the_logged_power_law() -> None:
    ctl = JacregController(lam=1.0, floor=0.01, lam_max=100.0, target=1e-3, ema=0.0)
    assert ctl.update(8e-3) == pytest.approx(8**0.3)


def test_adjoint_target_raises_lambda_while_the_forward_residual_is_below_target() -> None:
    """The failure it answers: a forward residual under target (lambda would sit at its floor)
    while the nudged phase's tail after t2_max is far above the adjoint target."""
    ctl = JacregController(lam=0.1, floor=0.1, lam_max=16.0, target=1e-4, ema=0.0,
                           adjoint_target=1e-2)
    assert ctl.update(5e-5, 8e-2) == pytest.approx(0.1 * 8**0.3)  # the larger ratio drives it
    assert ctl.update(5e-5, None) == pytest.approx(0.1 * 8**0.6)  # gate shut: last tail EMA
    for _ in range(100):  # both settled: back to the floor
        ctl.update(1e-6, 1e-4)
    assert ctl.lam == pytest.approx(0.1)
    ctl.update(1e-6, math.inf)  # unmeasured tail: 100x the target, not a pinned EMA
    assert ctl.adj_ema == pytest.approx(1.0) and ctl.lam == pytest.approx(0.1 * 100**0.3)
    plain = JacregController(lam=0.1, floor=0.1, target=1e-4, ema=0.0)
    assert plain.update(5e-5, 8e-2) == pytest.approx(0.1)  # off: the tail is ignored
    other = JacregController(lam=0.1, floor=0.1, target=1e-4, ema=0.0, adjoint_target=1e-2)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    other.load_state_dict({"lam": 0.3, "res_ema": 1e-5})  # a checkpoint from before the knob
    assert other.adj_ema is None


def test_adjoint_target_is_validated_against_the_row() -> None:
    from pydantic import ValidationError

    from models.config.eqt import BPTTRule

    with pytest.raises(ValidationError, match="adaptive_t2"):
        EPRule(stab=StabiliserConfig(adjoint_target=1e-2))
    with pytest.raises(ValidationError, match="bptt row"):
        BPTTRule(stab=StabiliserConfig(adjoint_target=1e-2))
    with pytest.raises(ValidationError, match="t2_max >= 3"):  # the rate needs 3 snapshots
        EPRule(stab=StabiliserConfig(adjoint_target=1e-2),
               nudge=NudgeConfig(adaptive_t2=True, t2_max=8, snapshot_every=4))
    EPRule(stab=StabiliserConfig(adjoint_target=1e-2),
           nudge=NudgeConfig(adaptive_t2=True, t2_max=12, snapshot_every=4))
    with pytest.raises(ValidationError, match="t2_tol set"):
        EPRule(stab=StabiliserConfig(adjoint_gate=1.0), nudge=NudgeConfig(adaptive_t2=True))
    with pytest.raises(ValidationError, match="adjoint_gate reads EP"):
        BPTTRule(stab=StabiliserConfig(adjoint_gate=1.0))


def test_ep_step_feeds_the_nudged_tail_to_the_controller() -> None:
    model, idx, tgt = make()
    cfg = EPRule(nudge=NudgeConfig(beta=1e-3, adaptive_t2=True, t2_max=16, snapshot_every=4),
                 stab=StabiliserConfig(target=1.0, adjoint_target=1e-2, ema=0.0))
    ctl = JacregController.from_config(cfg.stab)
    _, stats = gradients(model, idx, tgt, cfg, ctl)
    assert 0 < stats["a_tail_head"] < math.inf
    assert ctl.adj_ema == stats["a_tail_head"] and ctl.lam > cfg.stab.lam


def test_jacreg_hutchinson_is_unbiased_for_the_frobenius_norm() -> None:
    model, idx, _ = make()
    z = model.free_phase(idx).z
    with torch.no_grad():
        jac = torch.autograd.functional.jacobian(model.block.interaction, z)
    exact = float(jac.reshape(z.numel(), z.numel()).pow(2).sum() / z.numel())
    torch.manual_seed(1)
    est = sum(float(jacobian_penalty(model, z)) for _ in range(400)) / 400
    assert est == pytest.approx(exact, rel=0.1)
    pen = jacobian_penalty(model, z)
    grads = torch.autograd.grad(pen, [model.block.attn.q.weight, model.head.weight],
                                allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # differentiable in theta
    assert grads[1] is None  # the head is not part of F


def test_resreg_value_and_detached_state() -> None:
    model, idx, _ = make()
    run = model.free_phase(idx)
    z = run.z_t1.clone().requires_grad_(True)
    r = residual_penalty(model, idx, z)
    eps = model.relax_cfg.eps
    f = model.force(z.detach(), model.x_in(idx))
    assert float(r) == pytest.approx(float((eps * f).pow(2).sum()
                                           / (z.detach().pow(2).sum() + eps)))
    r.backward()
    assert z.grad is None and model.block.ffn.fc.weight.grad is not None


def test_gate_skips_task_gradient_but_keeps_stabiliser() -> None:
    model, idx, tgt = make(relax_cfg=RelaxConfig(eps=0.2, t1=3, t1max=3))  # far from converged
    ctl = JacregController(lam=1.0, floor=0.1, target=1e-3)
    cfg = EPRule(nudge=NudgeConfig(t2=5), stab=StabiliserConfig(gate=1e-3))
    grads, stats = gradients(model, idx, tgt, cfg, controller=ctl)
    assert stats["gate_skipped"] == 1.0 and stats["residual"] > 1e-3
    assert stats["lambda"] == 1.0 and "term/jacreg" in stats
    assert float(grads["head.weight"].abs().sum()) == 0.0  # no task term reached the head
    assert float(grads["block.attn.q.weight"].abs().sum()) > 0  # jacreg did reach attention
    assert ctl.lam > 1.0  # the large residual raised lambda for the next step


def test_adjoint_gate_leaves_exactly_the_stabiliser_gradient() -> None:
    """A shut adjoint gate gives the step a shut free gate gives (stabilisers only, the same
    probe), an open one the ungated step; the decision is the logged remaining change."""
    model, idx, tgt = make()
    nudge = NudgeConfig(beta=1e-3, adaptive_t2=True, t2_max=12, snapshot_every=4, t2_tol=1e-2,
                        t2_cap=32)

    def step(**stab: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        torch.manual_seed(3)  # the jacreg probe
        cfg = EPRule(nudge=nudge, stab=StabiliserConfig(controller=False, jacreg=0.5, **stab))
        return gradients(model, idx, tgt, cfg)

    plain, _ = step()
    free_shut, _ = step(gate=1e-300)
    shut, stats = step(adjoint_gate=1e-300)
    open_, open_stats = step(adjoint_gate=1e300)
    assert stats["gate_adjoint"] == 1.0 and open_stats["gate_adjoint"] == 0.0
    assert 0 < stats["settle/nudged/residual"] < math.inf
    for name in plain:
        torch.testing.assert_close(shut[name], free_shut[name], rtol=0, atol=0)
        torch.testing.assert_close(open_[name], plain[name], rtol=0, atol=0)
    assert float(plain["head.weight"].abs().sum()) > 0  # the task gradient reaches the head
    assert float(shut["head.weight"].abs().sum()) == 0  # the stabilisers do not


def test_step_is_task_gradient_plus_resreg_and_self_coherence_is_the_cosine() -> None:
    """The step's gradient is the rule's task gradient plus resreg * dR/dtheta (the identity
    ``models.eqt.step.gradients`` states), and self-coherence is the plain cosine."""
    model, idx, tgt = make()
    plain = EPRule(nudge=NudgeConfig(beta=1e-3, t2=30), stab=StabiliserConfig(controller=False))
    cfg = EPRule(nudge=plain.nudge, stab=StabiliserConfig(resreg=0.2, controller=False))
    g1, stats = gradients(model, idx, tgt, cfg)
    g0, stats0 = gradients(model, idx, tgt, plain)
    assert stats["gate_skipped"] == 0.0 and set(g1) == {n for n, _ in model.named_parameters()}
    run = model.free_phase(idx)
    r = residual_penalty(model, idx, run.z_t1)
    assert stats["term/resreg"] == pytest.approx(float(r)) and "term/resreg" not in stats0
    names = [n for n, _ in model.named_parameters()]
    dr = torch.autograd.grad(0.2 * r, list(model.parameters()), allow_unused=True)
    for n, d in zip(names, dr, strict=True):
        expect = g0[n] + (d if d is not None else 0)
        assert torch.allclose(g1[n], expect, rtol=1e-8, atol=1e-12), n
    assert stats["grad/global"] == pytest.approx(
        float(torch.sqrt(sum(g.pow(2).sum() for g in g1.values()))))
    g2, _ = gradients(model, idx, tgt, cfg)
    assert self_coherence(g1, g2) == pytest.approx(1.0)
    flat = lambda g: torch.cat([g[n].flatten() for n in names])  # noqa: E731
    idx2, tgt2 = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    g3 = gradients(model, idx2, tgt2, cfg)[0]
    assert self_coherence(g1, g3) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(flat(g1), flat(g3), dim=0)))
    assert self_coherence(g1, {n: -t for n, t in g1.items()}) == pytest.approx(-1.0)


def test_numerical_abscissa_matches_dense_eigendecomposition() -> None:
    model, idx, tgt = make()
    z = model.free_phase(idx).z
    x_in = model.x_in(idx).detach()
    with torch.no_grad():
        jac = torch.autograd.functional.jacobian(lambda u: model.force(u, x_in), z)
    j = jac.reshape(z.numel(), z.numel())
    exact = float(torch.linalg.eigvalsh(0.5 * (j + j.T)).max())
    est = numerical_abscissa(model, idx, z, iters=3000, tol=1e-13)
    assert est == pytest.approx(exact, abs=1e-3)
    _, jv = jvp(lambda u: model.force(u, x_in), (z,), (torch.ones_like(z),))
    assert torch.allclose(jv.flatten(), j @ torch.ones(z.numel(), dtype=z.dtype))
    fp = fingerprint(model, idx, tgt, EPRule(nudge=NudgeConfig(beta=1e-3, t2=30)), [(idx, tgt)])
    assert set(fp) == {"residual", "cos", "abscissa", "val_ce"}
    # non-normal J: a stable fixed point can have a positive abscissa (transient growth)
    assert fp["abscissa"] == pytest.approx(exact, abs=1e-2) and fp["cos"] > 0.99


def test_calibration_validates_searches_and_fails_clearly() -> None:
    model, idx, _ = make(relax_cfg=RelaxConfig(eps=0.2, t1=100, t1max=400, res_target=1e-6))
    out = calibrate(model, [idx, torch.randint(0, 11, (2, 6))])
    assert not out["changed"] and out["init_residual"] <= 1e-6
    assert math.isfinite(out["init_abscissa"])
    # eps = 1.5 overshoots (|1 - eps (1 + c)| > 1): search halves it until it converges
    hot, idx, _ = make(relax_cfg=RelaxConfig(eps=1.5, t1=20, t1max=100, res_target=1e-6))
    out = calibrate(hot, [idx])
    assert out["changed"] and out["relax"]["eps"] < 1.5 and not out["trials"][0]["ok"]
    with pytest.raises(ValueError, match=r"eps=1.5.*t1max.*damping"):
        calibrate(hot, [idx], search=False)
