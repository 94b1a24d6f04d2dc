"""Planted log-003 bugs: an equilibrium block pushed past contraction (Hopf / limit cycle),
an exploded state frozen by float absorption (res == 0, huge loss), NaN, and an EP estimator
whose batch self-coherence turns negative."""

from __future__ import annotations

import math

import pandas as pd
import torch

from models.health import Severity, fatal_findings, live_guard, run_all
from models.health.dynamics import (
    ep_self_coherence,
    frozen_explosion,
    gated_steps,
    limit_cycle,
    residual_growth,
)
from models.health.recorders import gradient_cosine

C, EPS, T1 = 16, 0.1, 300


def _rotations(scale: float) -> torch.Tensor:
    """Block-diagonal 2x2 rotations by 60 degrees, times ``scale``: eigenvalues
    scale * exp(+-i pi/3), so J(0) = -I + W loses contraction through a complex pair (Hopf) once
    scale * cos(60deg) > 1."""
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    block = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return scale * torch.block_diag(*[block] * (C // 2))


def _relax(scale: float) -> list[float]:
    """z <- z + eps (-z + W tanh z + x); relative residual |eps F| / |z| per step."""
    gen = torch.Generator().manual_seed(0)
    w, x = _rotations(scale), 0.1 * torch.randn(4, C, generator=gen, dtype=torch.float64)
    z, curve = x.clone(), []
    for _ in range(T1):
        step = EPS * (-z + torch.tanh(z) @ w.T + x)
        curve.append((step.norm() / z.norm()).item())
        z = z + step
    return curve


def test_block_past_contraction_cycles() -> None:
    (f,) = limit_cycle(_relax(scale=3.0))
    assert f.severity == Severity.ERROR and f.evidence["final"] > 1e-2
    assert "limit cycle" in f.message


def test_contractive_block_converges() -> None:
    assert limit_cycle(_relax(scale=0.5)) == []


def test_residual_grows_as_training_pushes_the_scale() -> None:
    scales = [0.5 + 0.1 * i for i in range(26)]  # 0.5 -> 3.0: drifts through the boundary at 2
    trace = pd.DataFrame({"step": range(len(scales)), "residual": [_relax(s)[-1] for s in scales]})
    (f,) = residual_growth(trace)
    assert f.severity == Severity.ERROR and f.evidence["late"] > 1e-2
    healthy = pd.DataFrame({"step": range(10), "residual": [_relax(0.5)[-1]] * 10})
    assert residual_growth(healthy) == []


def _frozen_run(exploded: bool, vocab: int = 65) -> dict[str, float]:
    """float32 relaxation; once |z| ~ 1e9, eps F (bounded by tanh) < ulp(z): z stops moving."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(C, C, generator=gen) / C**0.5
    head = torch.randn(C, vocab, generator=gen) / C**0.5
    x = torch.randn(8, C, generator=gen)
    z = x * (1e9 if exploded else 1.0)
    for _ in range(20):  # lambda -> 0 run: no damping, the force is bounded
        new = z + EPS * (torch.tanh(z) @ w.T + x - (0.0 if exploded else 1.0) * z)
        res = ((new - z).norm() / z.norm()).item()
        z = new
    loss = torch.nn.functional.cross_entropy(z @ head, torch.randint(0, vocab, (8,), generator=gen))
    return {"step": 100, "loss": loss.item(), "residual": res}


def test_res_zero_with_huge_loss_is_fatal() -> None:
    row = _frozen_run(exploded=True)
    assert row["residual"] == 0.0 and row["loss"] > 1.5 * math.log(65)
    (f,) = fatal_findings(row, vocab_size=65)
    assert f.severity == Severity.FATAL and f.detector == "frozen_explosion"
    assert live_guard(vocab_size=65)(row) is not None
    (g,) = frozen_explosion(pd.DataFrame([row]), loss_limit=1.5 * math.log(65))
    assert g.evidence["step"] == 100
    assert run_all(pd.DataFrame([row]), {"vocab_size": 65})[0].detector == "frozen_explosion"


def test_converged_small_loss_is_not_fatal() -> None:
    row = _frozen_run(exploded=False)
    assert fatal_findings(row, vocab_size=65) == [] and live_guard(vocab_size=65)(row) is None


def test_nan_is_fatal_live_and_in_trace() -> None:
    logits = torch.tensor([[0.0, 1.0]]) * torch.tensor(float("inf"))  # inf * 0 = NaN
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1])).item()
    row = {"step": 7, "loss": loss, "residual": 1e-5}
    (f,) = fatal_findings(row)
    assert f.detector == "non_finite" and "loss" in f.message and f.severity == Severity.FATAL
    trace = pd.DataFrame([{"step": 6, "loss": 1.0, "residual": 1e-5}, row])
    (g,) = [h for h in run_all(trace, {}) if h.detector == "non_finite"]
    assert "step 7" in g.message


def _ep_self_coherence(divide_by_signed_beta: bool, batches: int = 6) -> list[float]:
    """Centered-free, random-sign one-sided EP on a quadratic energy E = |z|^2/2 - z.Wx with
    nudge beta |z - y|^2 / 2; the contrast must be divided by the signed beta. The bug divides
    by |beta|, so alternating nudge signs flip the estimate from batch to batch."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = []
    for k in range(batches):
        beta = 0.05 * (1 if k % 2 == 0 else -1)
        x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
        y = x @ teacher.T
        z0 = (x @ w.T).detach()
        zb = ((x @ w.T + beta * y) / (1 + beta)).detach()
        def dedw(z: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            energy = (0.5 * z.pow(2).sum(1) - (z * (x @ w.T)).sum(1)).mean()
            return torch.autograd.grad(energy, w)[0]
        denom = beta if divide_by_signed_beta else abs(beta)
        grads.append((dedw(zb) - dedw(z0)) / denom)
    return [gradient_cosine([a], [b]) for a, b in zip(grads, grads[1:], strict=False)]


def test_negative_ep_self_coherence_fires() -> None:
    values = _ep_self_coherence(divide_by_signed_beta=False)
    (f,) = ep_self_coherence(values, reference=[0.96])
    assert f.severity == Severity.ERROR and f.evidence["self_coherence"] < -0.5
    assert any(g.detector == "ep_self_coherence" for g in run_all(
        pd.DataFrame({"step": [0]}), {"self_coherence": values}))


def test_signed_ep_estimator_is_coherent() -> None:
    values = _ep_self_coherence(divide_by_signed_beta=True)
    assert min(values) > 0.5 and ep_self_coherence(values) == []


def test_unstable_equilibrium_names_the_checkpoints() -> None:
    """cos_ref_unstable (reference_cosines: the damped adjoint iteration grew at z*) after the
    warm-up is a warning naming the steps and the residual that hid it; stable checkpoints, or
    an unstable one inside the warm-up, raise nothing."""
    from models.health.dynamics import unstable_equilibrium

    trace = pd.DataFrame({"step": [100, 250, 500, 750, 1000],
                          "residual": [1e-8, 2e-8, 5e-6, 3e-8, 7e-6],
                          "cos_ref_unstable": [1.0, 0.0, 1.0, math.nan, 1.0]})
    (found,) = unstable_equilibrium(trace, warmup_steps=200)
    assert found.severity == Severity.WARNING and "steps 500, 1000" in found.message
    assert "5.0e-06-7.0e-06" in found.message and found.evidence["checkpoints"] == 3.0
    assert "held-out" not in found.message
    assert [f.detector for f in run_all(trace, {"warmup_steps": 200})].count(
        "unstable_equilibrium") == 1
    stable = trace.assign(cos_ref_unstable=[1.0, 0.0, 0.0, 0.0, 0.0])
    assert unstable_equilibrium(stable, warmup_steps=200) == []
    assert unstable_equilibrium(trace.drop(columns="cos_ref_unstable")) == []
    # diagnose's held-out batches at the final weights, alone or with the checkpoints
    held = {"unstable_batches": 1.0, "diagnose_batches": 4.0, "cos_implicit_unstable": 0.37}
    (only,) = unstable_equilibrium(stable, held, warmup_steps=200)
    assert "on 1 of 4 held-out batches" in only.message and "0.370" in only.message
    assert "averages the stable held-out batches only" in only.message
    assert only.evidence == {"batches_unstable": 1.0}
    (both,) = unstable_equilibrium(trace, held, warmup_steps=200)
    assert "steps 500, 1000" in both.message and "1 of 4 held-out" in both.message
    assert unstable_equilibrium(stable, {**held, "unstable_batches": 0.0}, warmup_steps=200) == []


def test_estimator_accuracy_names_each_checkpoints_reference() -> None:
    """Below-the-bar checkpoints say what they were compared with: the implicit gradient itself
    (cos_ref_steps 0), an unroll of n steps, or the T1 unroll with no implicit gradient there."""
    from models.health.estimators import estimator_accuracy

    nan = math.nan
    trace = pd.DataFrame({"step": [250, 500, 750, 1000],
                          "cos/global": [0.90, 0.99, 0.80, 1.0],
                          "cos/attn.q": [0.95, 0.50, 0.95, 1.0],
                          "cos_implicit/global": [0.91, 0.99, nan, 1.0],
                          "cos_ref_steps": [0.0, 420.0, 150.0, 300.0],
                          "cos_ref_unstable": [0.0, 0.0, nan, 0.0]})
    (found,) = estimator_accuracy(trace, warmup_steps=200)
    assert found.evidence["checkpoints_below"] == 3.0
    assert "step 250: global +0.90 (to implicit 0.910; ref implicit)" in found.message
    assert "step 500: attn.q +0.50 (to implicit 0.990; ref unroll 420)" in found.message
    assert "step 750: global +0.80 (ref unroll 150: no implicit gradient)" in found.message
    assert "step 1000" not in found.message


def test_gated_steps_grades_the_share_of_steps_without_a_task_gradient() -> None:
    def trace(free: list[float], adjoint: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"step": range(len(free)), "gate_skipped": free,
                             "gate_adjoint": adjoint})

    assert gated_steps(trace([0.0] * 10, [0.0] * 9 + [1.0])) == []  # 10%: not above 10%
    (warn,) = gated_steps(trace([0.0] * 10, [1.0] * 3 + [0.0] * 7))
    assert warn.severity == Severity.WARNING and "gate_adjoint: 30% of 10" in warn.message
    (err,) = gated_steps(trace([1.0] * 6 + [0.0] * 4, [0.0] * 10))
    assert err.severity == Severity.ERROR and "gate_skipped: 60%" in err.message
    assert gated_steps(trace([1.0] * 3, [1.0] * 3)) == []  # too few rows to judge
