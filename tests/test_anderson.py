"""Anderson acceleration of the nudged phase (``models.eqt.anderson``, ``nudge.accel``).

Identities: the small solve is a linear solve; on a linear map Anderson with a full history is a
Krylov method (exact after dim + 1 steps) and beats the plain iteration; in EP it changes how the
nudged relaxation gets to its fixed point, not where it is (the same contrast as a long plain
relaxation), and the fast path's lockstep form is the eager loop step for step.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.config.eqt import EPRule, FastConfig, NudgeConfig, StabiliserConfig
from models.eqt.anderson import Anderson, spd_solve
from models.eqt.diagnostics import cosine
from models.eqt.ep import ep_gradients
from models.eqt.fast import FastEQ
from models.eqt.relax import RelaxConfig
from tests.test_eqt_fast import _close, make

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [1, 3, 8])
def test_spd_solve_is_a_linear_solve(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, b), torch.linalg.solve(a, b))


def _linear_map(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G(x) = A x + c with slow, rotating modes (spectral radius 0.97), and its fixed point."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    blocks = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(0, dim - 1, 2):
        r, th = 0.97 - 0.1 * i / dim, 0.3 + 0.2 * i / dim
        rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        blocks[i:i + 2, i:i + 2] = r * rot.double()
    a = q @ blocks @ q.T
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, c)
    return a, c, x_star


def _iterate(a: torch.Tensor, c: torch.Tensor, steps: int, m: int | None) -> torch.Tensor:
    x = torch.zeros_like(c)
    mixer = Anderson(x, m) if m else None
    for _ in range(steps):
        gx = a @ x + c
        x = gx if mixer is None else mixer.step(x, gx)
    return x


def test_full_history_anderson_is_exact_on_a_linear_map() -> None:
    """With m >= dim the mixed iterate minimises the residual over the whole Krylov space:
    the fixed point after dim + 1 steps (to the Tikhonov weight), where plain relaxation is
    still far off."""
    dim = 6
    a, c, x_star = _linear_map(dim)
    err = float((_iterate(a, c, dim + 2, m=dim) - x_star).norm() / x_star.norm())
    plain = float((_iterate(a, c, dim + 2, m=None) - x_star).norm() / x_star.norm())
    assert err < 1e-6, err
    assert plain > 0.3, plain


def test_short_history_beats_plain_relaxation() -> None:
    dim = 40
    a, c, x_star = _linear_map(dim)
    errs = {m: float((_iterate(a, c, 30, m) - x_star).norm() / x_star.norm()) for m in (None, 5)}
    assert errs[5] < 0.1 * errs[None], errs


def test_reset_forgets_the_history() -> None:
    dim = 6
    a, c, _ = _linear_map(dim)
    x0 = torch.zeros_like(c)
    first = Anderson(x0, 3)
    for _ in range(4):
        first.step(x0, a @ x0 + c + 1.0)  # a history of another map
    first.reset()
    fresh = Anderson(x0, 3)
    x1, x2 = x0, x0
    for _ in range(5):
        x1 = first.step(x1, a @ x1 + c)
        x2 = fresh.step(x2, a @ x2 + c)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)


def test_accelerated_nudged_phase_reaches_the_plain_contrast() -> None:
    """Where plain relaxation has converged (a long fixed T2), the accelerated phases give the
    same EP gradient; at a short T2 they are closer to it than plain relaxation."""
    model, idx, tgt = make(3, qk_norm=True)
    free = model.free_phase(idx)
    long, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=400), free)
    acc_long, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=400, accel="anderson"),
                               free)
    assert cosine(acc_long, long) > 1 - 1e-9
    gap = {}
    for accel in ("none", "anderson"):
        g, _ = ep_gradients(model, idx, tgt, NudgeConfig(beta=1e-3, t2=6, accel=accel), free)
        num = sum((g[n] - long[n]).pow(2).sum() for n in g)
        gap[accel] = float(num.sqrt() / sum(x.pow(2).sum() for x in long.values()).sqrt())
    assert gap["anderson"] < 0.5 * gap["none"], gap


@pytest.mark.parametrize("adaptive", [False, True])
def test_fast_lockstep_anderson_is_the_eager_loop(adaptive: bool) -> None:
    model, idx, tgt = make(4, qk_norm=True)
    nudge = NudgeConfig(beta=1e-3, t2=10, adaptive_t2=adaptive, t2_max=8, snapshot_every=4,
                        t2_tol=1e-4 if adaptive else None, t2_cap=48, accel="anderson", accel_m=3)
    cfg = EPRule(nudge=nudge, stab=StabiliserConfig(controller=False))
    free = model.free_phase(idx)
    g_ref, s_ref = ep_gradients(model, idx, tgt, nudge, free)
    fast = FastEQ(model, FastConfig(graphs=False, compile=False, nudge="lockstep"))
    g, s = fast.gradients(idx, tgt, cfg)
    if adaptive:
        assert s_ref["settle/nudged/iters"] > 8  # the continuation ran
        assert s["settle/nudged/iters"] == s_ref["settle/nudged/iters"]
    assert s["t2"] == s_ref["t2"]
    _close(g, g_ref)


def test_fast_differential_anderson_is_the_lockstep_estimator() -> None:
    model, idx, tgt = make(5, qk_norm=True)
    nudge = NudgeConfig(beta=1e-3, t2=12, accel="anderson")
    g_ref, _ = ep_gradients(model, idx, tgt, nudge)
    fast = FastEQ(model, FastConfig(graphs=False, compile=False))
    g, _ = fast.gradients(idx, tgt, EPRule(nudge=nudge, stab=StabiliserConfig(controller=False)))
    assert cosine(g, g_ref) > 1 - 1e-5


def test_anderson_needs_real_nudged_phases() -> None:
    with pytest.raises(ValidationError, match="accel: anderson mixes real nudged phases"):
        NudgeConfig(holomorphic_n=4, accel="anderson")
    with pytest.raises(ValidationError, match="accel_m"):
        NudgeConfig(accel="anderson", accel_m=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nudge", ["lockstep", "differential"])
def test_graphed_anderson_on_cuda(nudge: str, no_tf32: None) -> None:
    """The mixer's ring buffers and its small solve inside the captured nudged graphs: the
    replayed graphs give the chunks and the gradient of the same functions run without graphs."""
    relax_cfg = RelaxConfig(eps=0.1, t1=150, t1max=300, res_target=1e-4)
    model, idx, tgt = make(0, dtype=torch.float32, relax_cfg=relax_cfg, b=8, t=64, c=64,
                           device="cuda")
    cfg = EPRule(nudge=NudgeConfig(adaptive_t2=True, t2_max=8, t2_tol=1e-3, t2_cap=208,
                                   accel="anderson"),
                 stab=StabiliserConfig(jacreg=0.1, controller=False))
    out = {}
    for graphs in (False, True):
        fast = FastEQ(model, FastConfig(graphs=graphs, tf32=False, nudge=nudge))  # type: ignore[arg-type]
        for _ in range(2):  # a second replay reuses the captured graphs (and resets the mixer)
            g, s = fast.gradients(idx, tgt, cfg)
        out[graphs] = ({n: x.clone() for n, x in g.items()}, s)
    (g0, s0), (g1, s1) = out[False], out[True]
    for key in ("t2", "settle/nudged/iters"):
        assert s1[key] == s0[key], (key, s0, s1)
    assert cosine(g1, g0) >= 0.9999
