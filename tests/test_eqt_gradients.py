"""EP-family gradients against the exact implicit (IFT) gradient on a tiny equilibrium LM.

float64, V=11 T=6 C=8 H=2 B=2. The free phase is run to res 1e-12 so that the implicit
gradient, a long BPTT unroll and EP (small beta, long T2) all refer to the same z*.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from models.config.eqt import NudgeConfig
from models.eqt.bptt import bptt_gradients, reference_steps
from models.eqt.diagnostics import cosine, grad_cosines
from models.eqt.ep import RHO_MAX, ep_gradients, remaining_change
from models.eqt.implicit import ImplicitConfig, implicit_gradients
from models.eqt.model import EqShape, EquilibriumLM
from models.eqt.relax import RelaxConfig

TIGHT = RelaxConfig(eps=0.2, t1=100, t1max=3000, res_target=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead on shared cores
    yield
    torch.set_num_threads(n)


def make(seed: int, block: str = "thick", init_std: float = 0.3,
         relax_cfg: RelaxConfig = TIGHT) -> tuple[EquilibriumLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = EquilibriumLM(EqShape(11, 6, n_embd=8, n_head=2, block=block, init_std=init_std),
                          relax_cfg).double()
    idx = torch.randint(0, 11, (2, 6))
    return model, idx, torch.randint(0, 11, (2, 6))


def attn(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return cosine(g, ref, [n for n in g if ".attn." in n])


def test_implicit_matches_converged_bptt() -> None:
    model, idx, tgt = make(0)
    g_imp, stats = implicit_gradients(model, idx, tgt)
    assert stats["residual"] <= 1e-12
    long = EquilibriumLM(model.shape, RelaxConfig(eps=0.2, t1=int(stats["settle_iters"]) + 100,
                                                  t1max=5000)).double()
    long.load_state_dict(model.state_dict())
    g_bptt, bstats, _ = bptt_gradients(long, idx, tgt)
    assert bstats["residual"] < 1e-12
    assert cosine(g_imp, g_bptt) > 1 - 1e-9
    # a short, unconverged unroll is a different gradient: BPTT only equals IFT when converged
    short = EquilibriumLM(model.shape, RelaxConfig(eps=0.2, t1=5, t1max=5)).double()
    short.load_state_dict(model.state_dict())
    assert cosine(g_imp, bptt_gradients(short, idx, tgt)[0]) < 0.99


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_ep_aep_matches_implicit_and_no_aep_does_not(seed: int) -> None:
    model, idx, tgt = make(seed)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)
    cos = {}
    for aep in ("none", "fixed", "tracking"):
        g, stats = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=60, aep=aep), free)
        cos[aep] = grad_cosines(g, g_imp) | {"attn": attn(g, g_imp)}
        assert stats["residual"] <= 1e-12 and stats["t2"] == 60
    for aep in ("fixed", "tracking"):
        assert cos[aep]["cos/global"] >= 0.999, cos[aep]
        assert cos[aep]["attn"] >= 0.999, cos[aep]
        assert abs(cos[aep]["norm_ratio"] - 1) < 1e-2
    # uncorrected force-form EP is biased on a non-conservative block (log: ~0.25 on attention)
    assert cos["none"]["attn"] < cos["tracking"]["attn"] - 0.1, cos["none"]
    assert cos["none"]["cos/global"] < 0.95


def test_ep_matches_converged_bptt() -> None:
    model, idx, tgt = make(2)
    free = model.free_phase(idx)
    long = EquilibriumLM(model.shape, RelaxConfig(eps=0.2, t1=free.steps + 100,
                                                  t1max=5000)).double()
    long.load_state_dict(model.state_dict())
    g_bptt, _, _ = bptt_gradients(long, idx, tgt)
    g_ep, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=60, aep="tracking"), free)
    assert cosine(g_ep, g_bptt) >= 0.999


def test_holomorphic_beats_real_centered_at_large_radius() -> None:
    model, idx, tgt = make(0)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)

    def rel_err(g: dict[str, torch.Tensor]) -> float:
        diff = {n: g[n] - g_imp[n] for n in g}
        return float(sum(d.pow(2).sum() for d in diff.values()).sqrt()
                     / sum(r.pow(2).sum() for r in g_imp.values()).sqrt())

    r = 0.025  # per token (nudge_scale "token"): 0.3 on the mean loss over these B*T = 12
    g_holo, _ = ep_gradients(model, idx, tgt, NudgeConfig(t2=150, aep="tracking", holomorphic_n=4,
                                                       holomorphic_r=r), free)
    g_real, _ = ep_gradients(model, idx, tgt, NudgeConfig(t2=150, aep="tracking", beta=r), free)
    assert cosine(g_holo, g_imp) >= 0.999
    # bias O(r^N) vs O(r^2): much smaller error at the same radius
    assert rel_err(g_holo) < 0.1 * rel_err(g_real), (rel_err(g_holo), rel_err(g_real))
    # N = 2 on the circle is exactly the real centered estimator at beta = r
    g_n2, _ = ep_gradients(model, idx, tgt, NudgeConfig(t2=150, aep="tracking", holomorphic_n=2,
                                                     holomorphic_r=r), free)
    assert cosine(g_n2, g_real) > 1 - 1e-12


def test_conservative_block_needs_no_aep() -> None:
    model, idx, tgt = make(0, block="conservative", init_std=0.1)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)
    g_ep, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=60, aep="none"), free)
    assert cosine(g_ep, g_imp) >= 0.999
    # and the symmetric Jacobian really is symmetric: the AEP correction changes nothing
    g_fix, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=60, aep="fixed"), free)
    assert cosine(g_ep, g_fix) > 1 - 1e-9


def test_adaptive_t2_keeps_the_settled_snapshot() -> None:
    model, idx, tgt = make(0)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)
    cfg = NudgeConfig(beta=1e-3, aep="tracking", adaptive_t2=True, t2_max=80, snapshot_every=4)
    g, stats = ep_gradients(model, idx, tgt, cfg, free)
    assert 8 <= stats["t2"] <= 80 and stats["t2"] % 4 == 0
    assert cosine(g, g_imp) >= 0.999
    # a too-short fixed T2 is visibly worse than the selected snapshot
    g_short, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=4, aep="tracking"), free)
    assert cosine(g_short, g_imp) < cosine(g, g_imp)


def test_t2_continuation_settles_a_truncated_adjoint() -> None:
    """``t2_tol``: a nudged phase still moving after t2_max continues in chunks until its
    relative increment is under the tolerance (the GPU protocol's failing checkpoint: T2 cut at
    40 of 100 while the free phase needed 240 steps). With a too-short t2_max the adaptive rule
    alone picks a truncated snapshot; the continuation runs past it and reaches the implicit
    gradient, and reports its iterations and final increment for the settling health check."""
    model, idx, tgt = make(0)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)
    short = NudgeConfig(beta=1e-3, aep="tracking", adaptive_t2=True, t2_max=8, snapshot_every=4)
    g_short, s_short = ep_gradients(model, idx, tgt, short, free)
    assert "settle/nudged/iters" not in s_short
    cont = short.model_copy(update={"t2_tol": 1e-6, "t2_cap": 408})
    g, stats = ep_gradients(model, idx, tgt, cont, free)
    assert 8 < stats["settle/nudged/iters"] < 408
    assert (stats["settle/nudged/iters"] - 8) % cont.t2_chunk == 0
    assert stats["settle/nudged/residual"] <= 1e-6 < s_short["a_increment"] / s_short["a_norm"]
    assert stats["t2"] > 8
    assert cosine(g_short, g_imp) < 0.99 < 0.9999 <= cosine(g, g_imp)
    # a cap it cannot settle within: it stops there, above tolerance (what the detector reads)
    capped = short.model_copy(update={"t2_tol": 1e-14, "t2_cap": 28})
    _, s_cap = ep_gradients(model, idx, tgt, capped, free)
    assert s_cap["settle/nudged/iters"] == 28 and s_cap["settle/nudged/residual"] > 1e-14


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.97])
def test_remaining_change_is_the_geometric_tail(rho: float) -> None:
    """For increments shrinking by rho per snapshot the estimate is the exact distance to the
    limit; the last increment alone understates it by (1 - rho) / rho (the truncation at slow
    contraction). Past RHO_MAX the factor is capped, and without a measured rate it is unknown."""
    a_inf = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    e = torch.tensor([0.4, 0.2, -0.1], dtype=torch.float64)
    a = [a_inf + e * rho**t for t in range(6)]
    step = float((a[5] - a[4]).norm())
    measured = float((a[5] - a[4]).norm() / (a[4] - a[3]).norm())
    assert measured == pytest.approx(rho)
    rel = step / float(a[5].norm())
    truth = float((a[5] - a_inf).norm() / a[5].norm())
    assert remaining_change(rel, measured) == pytest.approx(truth, rel=1e-5)
    assert rel < truth
    assert remaining_change(rel, 1.5) == pytest.approx(rel * RHO_MAX / (1 - RHO_MAX))
    assert remaining_change(rel, -1.0) == float("inf")


def test_converged_reference_unroll_is_the_implicit_gradient() -> None:
    """The cosine checkpoints' reference: BPTT through the free phase's steps plus the implicit
    adjoint's iterations equals the implicit gradient, where the T1-step unroll does not."""
    model, idx, tgt = make(0, relax_cfg=RelaxConfig(eps=0.2, t1=12, t1max=3000,
                                                    res_target=1e-12))
    free = model.free_phase(idx)
    g_imp, stats = implicit_gradients(model, idx, tgt, free=free)
    assert free.steps > 12
    steps = reference_steps(free.steps, stats["adjoint_iters"], cap=10_000)
    assert steps == free.steps + stats["adjoint_iters"]
    g_long, _, _ = bptt_gradients(model, idx, tgt, steps)
    g_t1, _, _ = bptt_gradients(model, idx, tgt)
    assert cosine(g_long, g_imp) > 1 - 1e-9 and attn(g_long, g_imp) > 1 - 1e-9
    assert cosine(g_t1, g_imp) < 0.999
    assert reference_steps(free.steps, stats["adjoint_iters"], cap=50) == 50


def test_t2_tolerance_sees_a_slowly_settling_contrast() -> None:
    """At slow contraction the last increment is small while much of a is still to come; the
    tail estimate keeps the phase running (the GPU protocol's step-750 checkpoint, attn.q cos
    0.85 to the implicit gradient after stopping on a 0.33% increment)."""
    slow = RelaxConfig(eps=0.02, t1=100, t1max=20_000, res_target=1e-12)
    model, idx, tgt = make(0, relax_cfg=slow)
    free = model.free_phase(idx)
    g_imp, _ = implicit_gradients(model, idx, tgt, free=free)
    cfg = NudgeConfig(beta=1e-3, aep="tracking", adaptive_t2=True, t2_max=40, snapshot_every=4,
                      t2_tol=1e-3, t2_cap=2000)
    g, stats = ep_gradients(model, idx, tgt, cfg, free)
    assert stats["settle/nudged/residual"] <= 1e-3 and stats["settle/nudged/iters"] < 2000
    assert cosine(g, g_imp) > 1 - 1e-5 and attn(g, g_imp) > 1 - 1e-5
    # stopping at the first snapshot whose last increment is under the same tolerance (the
    # rule before the tail estimate) leaves a visibly truncated contrast
    t_stop = 40
    while True:
        g_short, s_short = ep_gradients(model, idx, tgt, cfg.model_copy(
            update={"t2_tol": None, "t2_max": t_stop}), free)
        if s_short["a_increment"] / s_short["a_norm"] <= 1e-3:
            break
        t_stop += 20
    assert t_stop < stats["settle/nudged/iters"]
    assert 1 - cosine(g_short, g_imp) > 10 * (1 - cosine(g, g_imp))


def test_krylov_adjoint_solves_what_the_damped_iteration_cannot_reach() -> None:
    """At slow contraction the damped iteration runs out of its budget; BiCGSTAB on the same
    matrix-free J^T reaches the same adjoint (and gradient) in far fewer products, and the
    reference then stands in for the converged unroll (steps = 0)."""
    from models.eqt.implicit import ImplicitConfig

    slow = RelaxConfig(eps=0.02, t1=100, t1max=20_000, res_target=1e-12)
    model, idx, tgt = make(0, relax_cfg=slow)
    free = model.free_phase(idx)
    g_neumann, s_neumann = implicit_gradients(model, idx, tgt, free=free)
    assert s_neumann["adjoint_solver"] == 0.0 and s_neumann["adjoint_iters"] > 1000
    g, stats = implicit_gradients(model, idx, tgt, ImplicitConfig(max_iter=300), free)
    assert stats["adjoint_solver"] == 1.0 and "adjoint_iters" not in stats
    assert stats["adjoint_residual"] <= 1e-10 and stats["adjoint_products"] < 300
    assert cosine(g, g_neumann) > 1 - 1e-12 and attn(g, g_neumann) > 1 - 1e-12
    with pytest.raises(ValueError, match="BiCGSTAB"):
        implicit_gradients(model, idx, tgt, ImplicitConfig(max_iter=6), free)


def _unstable_fixed_point() -> tuple[EquilibriumLM, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A true fixed point (Newton, |F|/|z| ~ 1e-14) at which J = dF/dz has an eigenvalue with
    real part +2.5: the free phase's damped iteration (eps 0.1) grows by 1.25 a step there."""
    from torch.autograd.functional import jacobian

    torch.manual_seed(2)
    model = EquilibriumLM(EqShape(11, 6, n_embd=8, n_head=2, init_std=0.3),
                          RelaxConfig(eps=0.1, t1=200, t1max=2000, res_target=1e-8)).double()
    with torch.no_grad():  # the scale of the GPU run's unstable checkpoints (models.eqt.implicit)
        model.block.attn.o.weight.mul_(2.0)
        model.block.ffn.proj.weight.mul_(2.0)
    idx, tgt = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    x_in = model.x_in(idx).detach()
    z = x_in.clone()
    for _ in range(12):
        jac = jacobian(lambda v: model.force(v, x_in), z).reshape(z.numel(), z.numel())
        z = (z - torch.linalg.solve(jac, model.force(z, x_in).detach().flatten()).view_as(z))
    jac = jacobian(lambda v: model.force(v, x_in), z).reshape(z.numel(), z.numel())
    assert float(model.force(z, x_in).detach().norm() / z.norm()) < 1e-12
    assert float(torch.linalg.eigvals(jac).real.max()) > 1.0
    # the exact adjoint, by a dense solve of J^T a = -dl/dz
    a = torch.linalg.solve(jac.T, -model.ce_grad_z(z, tgt).flatten()).view_as(z)
    return model, idx, tgt, (z.detach(), a)


def test_implicit_reference_at_an_unstable_fixed_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where z* is not stable under the free phase's iteration the damped adjoint iteration
    diverges; the reference is still the implicit gradient (float64 BiCGSTAB from the best
    damped iterate, not the diverged one) and says z* is unstable. A float32 model gets it to
    its 1e-6 tolerance: the solve runs in float64 (a CPU case at the GPU protocol's shape: the
    damped iteration at 7.6e19, fp32 BiCGSTAB from it at 1.7e14, from zero stalled at 1.3e-6).
    With no early stop the last damped iterate is not finite: only the best one is a start."""
    from models.eqt import implicit
    from models.eqt.ep import contrast_gradients
    from models.eqt.relax import RelaxResult

    model, idx, tgt, (z, a_exact) = _unstable_fixed_point()
    exact = contrast_gradients(model, idx, tgt, z, a_exact)
    m32 = EquilibriumLM(model.shape, model.relax_cfg)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for m, tol, diverged in ((model, 1e-10, 1e3), (m32, 1e-6, 1e3), (m32, 1e-6, math.inf)):
        monkeypatch.setattr(implicit, "DIVERGED", diverged)
        zz = z.to(next(m.parameters()).dtype)
        free = RelaxResult(z=zz, z_t1=zz, residual=1e-9, residual_t1=1e-9, steps=200)
        g, stats = implicit_gradients(m, idx, tgt, ImplicitConfig(tol=tol, max_iter=500), free)
        assert stats["adjoint_unstable"] == 1.0 and stats["adjoint_solver"] == 1.0
        assert stats["adjoint_residual"] <= tol and stats["adjoint_neumann_residual"] > 1e-3
        g = {n: t.double() for n, t in g.items()}
        assert cosine(g, exact) > 1 - 10 * tol and attn(g, exact) > 1 - 10 * tol


def test_slowly_growing_and_unsolved_adjoints_still_say_unstable() -> None:
    """A growing mode too slow to reach the divergence stop within max_iter (eps 5e-4: 1.00125
    a step) is still unstable; and where neither solver converges the failure keeps the flag,
    so a checkpoint without a reference still says why."""
    from models.eqt.implicit import AdjointNotSolved
    from models.eqt.relax import RelaxResult

    model, idx, tgt, (z, _) = _unstable_fixed_point()
    free = RelaxResult(z=z, z_t1=z, residual=1e-9, residual_t1=1e-9, steps=200)
    with pytest.raises(AdjointNotSolved) as err:  # 1e-30: beyond float64
        implicit_gradients(model, idx, tgt, ImplicitConfig(tol=1e-30, max_iter=100), free)
    assert err.value.stats["adjoint_unstable"] == 1.0 and "unstable" in str(err.value)
    model.relax_cfg = RelaxConfig(eps=5e-4, t1=200, t1max=2000, res_target=1e-8)
    _, stats = implicit_gradients(model, idx, tgt, ImplicitConfig(tol=1e-10, max_iter=2000),
                                  free)
    assert stats["adjoint_unstable"] == 1.0 and stats["adjoint_solver"] == 1.0
    stable, idx, tgt = make(0)
    _, stats = implicit_gradients(stable, idx, tgt, ImplicitConfig(tol=1e-10, max_iter=50))
    assert stats["adjoint_unstable"] == 0.0 and stats["adjoint_solver"] == 1.0


def test_cosine_reference_at_an_unstable_fixed_point_is_the_t1_unroll() -> None:
    """No unroll converges at an unstable z*: the checkpoints' reference is then BPTT through
    T1 steps (the BPTT gradient there is), flagged unstable; the implicit gradient is still given
    (logged as cos_implicit/*). Where z* is stable, the converged unroll (test above)."""
    from models.config.eqt import EPRule
    from models.eqt.relax import RelaxResult
    from models.studies.eqt_lm.equilibrium import Equilibrium, reference_cosines

    model, idx, tgt, (z, _) = _unstable_fixed_point()
    rule = Equilibrium(model, EPRule())
    free = RelaxResult(z=z, z_t1=z, residual=1e-9, residual_t1=1e-9, steps=200)
    refs = rule.references(model, idx, tgt, free)
    assert refs["unstable"] == 1.0 and refs["steps"] == model.relax_cfg.t1
    assert refs["bptt"] is refs["t1"] and refs["implicit"] is not None
    cos = reference_cosines(refs["implicit"], refs)
    assert cos["cos_ref_unstable"] == 1.0 and cos["cos_implicit/global"] == pytest.approx(1.0)
    stable, idx, tgt = make(0)
    refs = rule.references(stable, idx, tgt)
    assert refs["unstable"] == 0.0 and refs["steps"] > stable.relax_cfg.t1


def test_bicgstab_stops_on_a_breakdown() -> None:
    """A rotation has r^T A r = 0 for every r: the first step breaks down. The solver stops and
    reports its residual (the caller raises a ValueError) instead of dividing by zero."""
    from models.eqt.implicit import bicgstab

    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x, rel, products = bicgstab(lambda v: rot @ v, b, torch.zeros_like(b), 1e-10, 100)
    assert rel == pytest.approx(1.0) and products < 10 and torch.isfinite(x).all()


def test_complex_force_extends_the_real_force() -> None:
    model, idx, _ = make(1)
    x_in = model.x_in(idx).detach()
    z = x_in + 0.1 * torch.randn_like(x_in)
    real = model.block(z, x_in)
    cplx = model.block.forward_complex(z.to(torch.complex128), x_in.to(torch.complex128))
    assert torch.allclose(cplx.real, real, atol=1e-12) and cplx.imag.abs().max() < 1e-12


def test_fp32_implicit_reference_matches_float64_and_refuses_unconverged() -> None:
    """The diagnose stage's reference: the implicit gradient solved in fp32 to 1e-6 is the
    float64 one; an unconverged free phase gives no reference (and says why), never a wrong one."""
    from models.eqt.implicit import reference_gradients

    model, idx, tgt = make(1)
    g64, _ = implicit_gradients(model, idx, tgt)
    m32 = EquilibriumLM(model.shape, RelaxConfig(eps=0.2, t1=100, t1max=3000, res_target=1e-6))
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g32, stats = reference_gradients(m32, idx, tgt)
    assert g32 is not None and stats["adjoint_residual"] <= 1e-6
    assert cosine(g32, g64) > 1 - 1e-6
    short = EquilibriumLM(model.shape, RelaxConfig(eps=0.2, t1=3, t1max=3, res_target=1e-6))
    short.load_state_dict(m32.state_dict())
    none, why = reference_gradients(short, idx, tgt)
    assert none is None and "converged free phase" in str(why["reason"])


def test_held_out_cosines_average_the_implicit_gradient_over_stable_batches_only() -> None:
    """diagnose: cos/*, cos_t1/* and the norm ratio average every batch; cos to implicit only the
    batches whose z* is stable (where it is the converged unroll's limit). An unstable batch is
    counted, with its own cosine to the implicit gradient, and a batch without an implicit
    gradient is in neither."""
    from models.studies.eqt_lm.equilibrium import held_out_cosines

    def row(cos: float, imp: float | None, unstable: float) -> dict[str, float]:
        out = {"cos/global": cos, "cos/attn.q": cos, "cos_t1/global": cos - 0.1,
               "norm_ratio": 2 * cos, "cos_ref_steps": 150.0, "cos_ref_unstable": unstable}
        if imp is not None:
            out |= {"cos_implicit/global": imp, "cos_implicit/attn.q": imp,
                    "cos_bptt_implicit": imp, "norm_ratio_implicit": 2 * imp}
        return out

    m = held_out_cosines([row(1.0, 0.99, 0.0), row(0.99, 0.37, 1.0), row(0.98, 0.97, 0.0),
                          row(0.97, None, math.nan)])
    assert m["cos_bptt"] == pytest.approx(0.985) and m["cos/attn.q"] == pytest.approx(0.985)
    assert m["cos_t1/global"] == pytest.approx(0.885) and m["norm_ratio"] == pytest.approx(1.97)
    assert m["cos_implicit"] == pytest.approx(0.98) and m["cos_implicit/attn.q"] == pytest.approx(0.98)
    assert m["cos_bptt_implicit"] == pytest.approx(0.98) and "cos_implicit/global" not in m
    assert m["norm_ratio_implicit"] == pytest.approx(1.96)
    assert m["cos_implicit_unstable"] == pytest.approx(0.37)
    assert (m["implicit_batches"], m["unstable_batches"], m["diagnose_batches"]) == (3, 1, 4)
    none = held_out_cosines([row(0.9, None, math.nan)])
    assert "cos_implicit" not in none and "cos_implicit_unstable" not in none
    assert none["unstable_batches"] == 0.0


def test_segment_checkpointed_unroll_gives_the_same_bptt_gradient(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A differentiable unroll above CHECKPOINT_ELEMENTS keeps every chunk-th state and recomputes
    the rest in the backward pass: the same gradients and residual trace as the full graph (the
    eager BPTT at the log's shape, which needs ~28 GB whole)."""
    from models.eqt import bptt, relax

    model, idx, tgt = make(0)
    steps = model.relax_cfg.chunk * 2 + 3  # two whole chunks and a remainder
    plain, _, run = bptt.bptt_gradients(model, idx, tgt, steps)
    calls = []

    def counting(fn, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(args[2])
        return torch.utils.checkpoint.checkpoint(fn, *args, **kw)

    monkeypatch.setattr(relax, "CHECKPOINT_ELEMENTS", 0)
    monkeypatch.setattr(relax, "checkpoint", counting)
    segmented, _, run_seg = bptt.bptt_gradients(model, idx, tgt, steps)
    assert calls == [model.relax_cfg.chunk] * 2 + [3]
    assert run_seg.trace == run.trace and torch.equal(run_seg.z, run.z)
    for name, g in plain.items():
        torch.testing.assert_close(segmented[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_tracking_aep_of_two_phases_is_one_correction_with_opposite_signs() -> None:
    """What the two-phase tracking-AEP step relies on: about the common mode zbar the phases sit
    at zbar +- d, and (J - J^T) v is linear in v, so the stacked correction of both phases is
    (+c, -c) with c computed once on B rows."""
    from models.eqt.ep import _correction

    model, idx, _ = make(3)
    z = model.free_phase(idx).z
    d = 0.05 * torch.randn_like(z)
    fn = model.block.interaction
    c = _correction(fn, z, d)
    both = _correction(fn, torch.cat([z, z]), torch.cat([d, -d]))
    torch.testing.assert_close(both, torch.cat([c, -c]), rtol=1e-12, atol=1e-14)
    assert c.abs().max() > 1e-4  # a non-conservative block: the correction is not zero
