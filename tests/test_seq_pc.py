"""The predictive-coding hierarchy (models.seq.pc): settled errors give the BP gradient in the
small-error regime, training shortens settling, and a training step needs the memory of
settling alone, flat in the number of iterations (BP through settling grows)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.config.seq import PCModelConfig, PrecisionConfig, SettleConfig
from models.seq import pc
from models.seq.memory import PeakMemory
from models.seq.precision import Precision

torch.set_num_threads(1)


def _net(dtype: torch.dtype = torch.float64, vocab: int = 12, seed: int = 0) -> pc.PCNet:
    torch.manual_seed(seed)
    return pc.PCNet(PCModelConfig(context=3, n_embd=6, width=24, depth=3), vocab).to(dtype)


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa = torch.cat([t.flatten() for t in a])
    fb = torch.cat([t.flatten() for t in b])
    return float(fa @ fb / (fa.norm() * fb.norm()))


def test_settled_errors_give_the_bp_gradient_in_the_small_error_regime() -> None:
    net = _net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(12, (16, 3), generator=gen), torch.randint(12, (16,), generator=gen)
    pi = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # precisions must not matter
    bp = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    cfg = SettleConfig(step=0.2, tol=1e-9, max_iters=2000)
    small = pc.settle(net, x, y, pi, 1e-3, cfg, 0.2)
    assert small.residual <= 1e-9
    g = pc.local_grads(net, x, small.states, y, pi, 1e-3)
    assert _cos(g, bp) >= 0.95
    assert abs(torch.cat([t.flatten() for t in g]).norm()
               / torch.cat([t.flatten() for t in bp]).norm() - 1) < 0.05
    for i, c in enumerate(pc.credits(net, x, small.states, pi, 1e-3)):  # per-layer credit too
        h = [s.detach().requires_grad_(True) for s in net.states(x)]
        ref = torch.autograd.grad(F.cross_entropy(net.logits(_chain(net, h, i)), y), h[i])[0]
        assert _cos([c], [ref]) >= 0.95
    # Unsettled (one step) or a strong clamp is not the small-error regime: the test can fail.
    one = pc.settle(net, x, y, pi, 1e-3, SettleConfig(step=0.2, tol=1e-9, max_iters=1), 0.2)
    assert _cos(pc.local_grads(net, x, one.states, y, pi, 1e-3), bp) < 0.95


def _chain(net: pc.PCNet, h: list[torch.Tensor], i: int) -> torch.Tensor:
    """h_L as a function of h_i by the prediction pass from layer i."""
    out = h[i]
    for j in range(i + 1, len(h)):
        out = net.predict(j, out)
    return out


def _task(n: int, gen: torch.Generator, learnable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable next-token rule, y = x_2 + 1 mod V, or labels unrelated to the context."""
    x = torch.randint(12, (n, 3), generator=gen)
    y = (x[:, 2] + 1) % 12 if learnable else torch.randint(12, (n,), generator=gen)
    return x, y


def _distance(net: pc.PCNet, x: torch.Tensor, y: torch.Tensor, pi: torch.Tensor,
              s: pc.Settled) -> float:
    """||h - h*|| / ||h*||: how far a settled state is from the equilibrium."""
    ref = pc.settle(net, x, y, pi, 1.0, SettleConfig(tol=1e-8, max_iters=5000), 0.5)
    return float((torch.cat(s.states, 1) - torch.cat(ref.states, 1)).norm()
                 / torch.cat(ref.states, 1).norm())


def _settle_before_after(learnable: bool) -> tuple[pc.Settled, pc.Settled, float, float, float]:
    """Settling on held-out windows at init and after 150 local-update steps."""
    torch.manual_seed(0)
    net = pc.PCNet(PCModelConfig(context=3, n_embd=8, width=32, depth=2), 12)
    prec = Precision(2, PrecisionConfig(), torch.device("cpu"))
    cfg = SettleConfig(tol=1e-3, max_iters=100)
    gen = torch.Generator().manual_seed(0)
    x_val, y_val = _task(64, gen, learnable)
    before = pc.settle(net, x_val, y_val, prec.values(), 1.0, cfg, cfg.step)
    d_before = _distance(net, x_val, y_val, prec.values(), before)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        x, y = _task(32, gen, learnable)
        pi = prec.values()
        s = pc.settle(net, x, y, pi, 1.0, cfg, cfg.step)
        for p, g in zip(net.parameters(), pc.local_grads(net, x, s.states, y, pi, 1.0),
                        strict=True):
            p.grad = g
        opt.step()
        eps = pc.errors(net, net.top(x), s.states)
        prec.update(torch.stack([(pi[i] * e).pow(2).mean() for i, e in enumerate(eps)]))
    after = pc.settle(net, x_val, y_val, prec.values(), 1.0, cfg, cfg.step)
    d_after = _distance(net, x_val, y_val, prec.values(), after)
    ce = float(F.cross_entropy(net(x_val).detach(), y_val))
    return before, after, d_before, d_after, ce


def test_settling_is_shorter_after_training() -> None:
    """Log 001's effect where predictions become right: the clamp then moves the states little
    (0.1% of ||h|| vs 15% at init), so settling reaches the same tolerance in fewer iterations,
    and no less accurately (the stop is not bought by a smaller step). The control trains the
    same way on labels the context does not predict: weights and precisions change as much, the
    predictions do not improve, and settling does not shorten, so the assertion can fail."""
    before, after, d_before, d_after, ce = _settle_before_after(learnable=True)
    assert before.residual <= 1e-3 and after.residual <= 1e-3  # converged, not at the cap
    assert ce < 0.5  # it learned the rule
    assert after.iters < 0.6 * before.iters, (before.iters, after.iters)
    assert d_after <= d_before, (d_before, d_after)
    before, after, _, _, ce = _settle_before_after(learnable=False)
    assert ce > 2.0  # nothing to learn (ln 12 = 2.48)
    assert after.iters >= before.iters, (before.iters, after.iters)


def test_time_constants_are_the_diagonal_hessian_blocks() -> None:
    """tau_l (the scale of the step) is the top eigenvalue of E's diagonal Hessian block in h_l
    at the prediction pass, from the exact per-sample Hessian, and under the norm bound that
    ignores phi' and the softmax; the whole preconditioned Hessian is above 1 (the layers
    couple) and at most 2 (what the step limit of SettleConfig assumes)."""
    net = _net()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randint(12, (4, 3), generator=gen), torch.randint(12, (4,), generator=gen)
    pi = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    beta = 2.0
    with torch.no_grad():
        top, hs = net.top(x), net.states(x)
    tau = torch.tensor(pc.time_constants(net, pi, beta, hs, y, iters=200), dtype=torch.float64)
    w, n = hs[0].shape[1], len(hs)
    top_eig, pre = torch.zeros(n, dtype=torch.float64), []
    scale = tau.repeat_interleave(w).rsqrt()
    for b in range(x.shape[0]):
        def e(v: torch.Tensor, b: int = b) -> torch.Tensor:
            states = [v[i * w:(i + 1) * w].unsqueeze(0) for i in range(n)]
            return pc.energy(net, top[b:b + 1], states, y[b:b + 1], pi, beta)

        hess = torch.autograd.functional.hessian(e, torch.cat([h[b] for h in hs]))
        top_eig = torch.maximum(top_eig, torch.stack([
            torch.linalg.eigvalsh(hess[i * w:(i + 1) * w, i * w:(i + 1) * w])[-1]
            for i in range(n)]))
        pre.append(float(torch.linalg.eigvalsh(scale[:, None] * hess * scale[None, :])[-1]))
    assert torch.allclose(tau, top_eig, rtol=1e-6)
    assert 1.0 < max(pre) <= 2.0
    bound = torch.stack([pi[i] + (pi[i + 1] if i + 1 < n else beta / 2)
                         * torch.linalg.matrix_norm(m.weight, 2) ** 2
                         for i, m in enumerate([*net.layers[1:], net.readout])])
    assert torch.all(bound >= tau), (bound, tau)  # at init; 7x in the last layer late in training


def test_settling_noise_is_langevin_noise_of_the_plain_step() -> None:
    """Momentum must not change what the noise does: run past the tolerance (the noise keeps the
    drift above it, so the loop runs to its cap), the accelerated loop's states scatter around
    the equilibrium as far as plain Langevin gradient steps at the same step / tau_l do."""
    net = _net(torch.float32)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randint(12, (64, 3), generator=gen), torch.randint(12, (64,), generator=gen)
    pi, noise = torch.ones(3), 1e-2
    ref = torch.cat(pc.settle(net, x, y, pi, 1.0, SettleConfig(tol=1e-7, max_iters=3000),
                              0.5).states, 1)
    cfg = SettleConfig(tol=1e-4, max_iters=150)
    runs = [pc.settle(net, x, y, pi, 1.0, cfg, 0.5, noise, torch.Generator().manual_seed(k))
            for k in (0, 1)]
    assert all(r.iters == cfg.max_iters and r.residual > cfg.tol for r in runs)
    spread = sum(float((torch.cat(r.states, 1) - ref).norm()) for r in runs) / 2
    with torch.no_grad():
        top, hs = net.top(x), net.states(x)
    tau = pc.time_constants(net, pi, 1.0, hs, y)
    kicks = torch.Generator().manual_seed(9)
    for _ in range(400):
        with torch.enable_grad():
            hs = [h.detach().requires_grad_(True) for h in hs]
            grads = torch.autograd.grad(pc.energy(net, top, hs, y, pi, 1.0), hs)
        hs = [h.detach() - 0.5 / t * g + math.sqrt(2 * 0.5 / t) * noise
              * torch.randn(h.shape, generator=kicks) for h, t, g in zip(hs, tau, grads, strict=True)]
    plain = float((torch.cat(hs, 1) - ref).norm())
    assert 0.8 < spread / plain < 1.25, (spread, plain)


def _peaks(iters: int) -> tuple[int, int, int]:
    net = _net(torch.float32, vocab=50)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(50, (128, 3), generator=gen), torch.randint(50, (128,), generator=gen)
    pi = torch.ones(3)
    cfg = SettleConfig(step=0.2, tol=1e-12, max_iters=iters)  # runs exactly `iters` steps
    with PeakMemory() as infer:
        s = pc.settle(net, x, y, pi, 1.0, cfg, 0.2)
    assert s.iters == iters
    with PeakMemory() as train:
        s = pc.settle(net, x, y, pi, 1.0, cfg, 0.2)
        pc.local_grads(net, x, s.states, y, pi, 1.0)
    with PeakMemory() as unrolled:
        pc.unrolled_grads(net, x, y, pi, 1.0, 0.2, iters)
    return train.peak, infer.peak, unrolled.peak


def test_training_memory_equals_inference_and_is_flat_in_settling_iterations() -> None:
    train5, infer5, bp5 = _peaks(5)
    train40, infer40, bp40 = _peaks(40)
    assert infer5 > 0
    assert train5 <= 1.5 * infer5 and train40 <= 1.5 * infer40
    assert train40 <= 1.05 * train5  # flat in the number of settling iterations
    assert bp40 > 3 * bp5  # backprop through settling keeps every iteration's graph
    assert bp40 > 3 * train40


def test_peak_memory_meter_counts_what_is_alive() -> None:
    with PeakMemory() as m:
        a = torch.empty(1000, dtype=torch.float32).fill_(1.0)  # 4000 bytes
        b = a * 2
        del a, b
        c = torch.empty(500, dtype=torch.float32).fill_(1.0)
    assert m.peak == 8000
    assert m.current == 2000
    del c
