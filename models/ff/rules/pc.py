"""Predictive coding with a clamped output, settling to equilibrium, and learned precisions.

Energy of one sample (x clamped at the bottom, h_{-1} := x, f_l the net's layer l, y the target):

    E(h) = sum_l pi_l / 2 * ||h_l - f_l(h_{l-1})||^2  +  l(head(h_L), y)

**Clamped output.** The output node is not a state: it is fixed to the target y, and its energy
is its negative log-likelihood under the head's prediction, -log p(y | h_L) = the task loss (CE:
a categorical node clamped to the class; MSE: a unit-precision Gaussian node clamped to y). The
weight is 1, not a tunable beta: a small weight would be EP-style nudging, not a clamp. So
settled errors are not small and the credit is PC's own (prospective) credit, which equals BP's
only in the small-error limit (tested with ``output_weight`` << 1 in the tests only).

**Settling.** All h_l start at the feed-forward pass and descend E with heavy-ball momentum
(v <- mu v + dE/dh, h <- h - gamma / max_l pi_l * v; the max-precision preconditioner keeps the
step stable as precisions grow; momentum, the usual PC inference optimiser, is needed because the
residual chain h_0..h_L is a path graph whose slowest mode decays ~depth^2 times slower than its
fastest), with a per-sample adaptive restart and step halving when a sample's energy rises
(``settle``). With a final LayerNorm the clamp can pull h_L toward LN_f's singular point (all
units equal, where LN_f turns its output at no cost): the energy gets stiff there, which the
per-sample step absorbs; a sample that stays stiff shows up as a residual above tolerance.
The equilibrium test is scale free: residual = ||dE/dh|| / ||dE/dh at the feed-forward pass||
(the fraction of the clamp's initial force still unbalanced) <= ``settle_tol``, or
``settle_iters``. Optional Langevin noise sqrt(2 gamma') sigma_e xi, annealed per epoch (sigma_e
= noise_std * noise_anneal^epoch; log 001).

At equilibrium pi_l eps_l = J_{l+1}^T pi_{l+1} eps_{l+1} and pi_L eps_L = -dl/dh_L, so the credit
for h_l is -pi_l eps_l (divided by the batch size, the batch-mean convention). Weights update
locally from the settled errors: dE/dtheta_l = -pi_l eps_l df_l/dtheta_l at the settled states
(``apply_credit`` with the settled h). Evaluation is the plain forward pass (the unclamped
equilibrium).

**Precisions** pi_l = floor + softplus(r_l), one per layer, learned after each step on the
Gaussian free energy of the settled errors plus an exponential prior of rate b per unit,

    F(pi_l) = pi_l m_l / 2 - (1/2) log pi_l + b pi_l,     m_l = mean over batch and units of eps^2

whose minimiser is 1 / (m_l + 2b). The prior is not decoration: under a clamped output the
settled errors scale as 1/pi (pi eps is fixed by the clamp), so the prior-free fixed point
pi = E[(pi eps)^2] is unstable and every precision either runs away or falls to the floor. With
the prior, the stable point is near 1 / (2b) minus the error term. The floor keeps the net from
muting its own errors (log 001); a damping term kappa/2 (r - r_bar)^2 towards a slow EMA r_bar
stops adjacent precisions from oscillating (log 000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config.ff_rules.pc import FFPCRule
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms
from models.ff.rules.base import Rule


def _inv_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))


class PC(Rule):
    name = "pc"

    def __init__(self, net: DeepMLP, cfg: FFPCRule | None = None, seed: int = 0) -> None:
        super().__init__(net, cfg or FFPCRule(), seed)
        self.net: DeepMLP = net
        c = self.cfg
        if c.precision_init <= c.precision_floor:
            raise ValueError("precision_init must exceed precision_floor")
        r0 = _inv_softplus(c.precision_init - c.precision_floor)
        n = len(net.layer_names())
        self.r = nn.Parameter(torch.full((n,), r0, dtype=self.dtype, device=self.device))
        self.r_bar = torch.full((n,), r0, dtype=self.dtype, device=self.device)
        self.opt = torch.optim.SGD([self.r], lr=c.precision_lr)
        self.last_ff_loss = float("nan")  # feed-forward loss of the last settle (for stats)

    def calibrate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        if not self.cfg.calibrate_settle:
            return {}
        try:
            return calibrate_pc(self, x, y)
        except RuntimeError as err:
            raise ValueError(f"calibration: {err}; raise rules.<row>.settle_tol") from None

    def apply_calibration(self, cal: dict[str, Any]) -> None:
        if self.cfg.calibrate_settle:
            self.cfg = self.cfg.model_copy(update={"settle_lr": float(cal["settle_lr"])})

    def aux(self) -> dict[str, object]:
        return {"opt": self.opt}

    def buffers(self) -> dict[str, Tensor]:
        return {"r": self.r.data, "r_bar": self.r_bar}

    def precision(self) -> Tensor:
        return self.cfg.precision_floor + F.softplus(self.r)

    # --- inference -------------------------------------------------------------------------
    def errors(self, x: Tensor, hs: list[Tensor]) -> list[Tensor]:
        return [h - self.net.layer(i, x if i == 0 else hs[i - 1]) for i, h in enumerate(hs)]

    def energy(self, x: Tensor, hs: list[Tensor], y: Tensor, pi: Tensor) -> Tensor:
        """E per sample, shape (B,) (samples settle independently; their sum is the batch E)."""
        e = sum(0.5 * pi[i] * eps.pow(2).sum(-1) for i, eps in enumerate(self.errors(x, hs)))
        out = self.net.readout(hs[-1])
        return e + self.cfg.output_weight * self.net.per_sample_loss(out, y)

    def settle(self, x: Tensor, y: Tensor, noise: float = 0.0) -> tuple[list[Tensor], int, float]:
        """Settled states, iterations used, final residual (fraction of the initial force).

        Each sample's states are an independent system, so each keeps its own step: when a
        sample's energy rises, that sample goes back to its last point and drops its momentum
        (adaptive restart), and if a plain gradient step overshot, its step halves. (Without
        this one stiff sample, e.g. one whose h_L nears LN_f's singular point, stalls the batch.)
        """
        c = self.cfg
        pi = self.precision().detach()
        with torch.no_grad():
            hs = self.net.states(x)
            self.last_ff_loss = float(self.net.loss(self.net.readout(hs[-1]), y))
        b = x.shape[0]
        lr = x.new_full((b, 1), c.settle_lr / float(pi.max()))
        vel = [torch.zeros_like(h) for h in hs]
        run = torch.zeros(b, dtype=torch.long, device=x.device)  # steps since velocity was 0
        prev_e, prev_h = None, hs
        iters, res, force0 = 0, 1.0, 0.0
        with torch.enable_grad():
            while True:
                hs = [h.detach().requires_grad_(True) for h in hs]
                energy = self.energy(x, hs, y, pi)
                if prev_e is not None and noise == 0:
                    over = energy.detach() > prev_e
                    if bool(over.any()):
                        o = over[:, None]
                        lr = torch.where(o & (run[:, None] <= 1), lr / 2, lr)
                        hs = [torch.where(o, p, h.detach()).requires_grad_(True)
                              for p, h in zip(prev_h, hs, strict=True)]
                        vel = [torch.where(o, 0.0, v) for v in vel]
                        run = torch.where(over, 0, run)
                        energy = self.energy(x, hs, y, pi)
                grads = torch.autograd.grad(energy.sum(), hs)
                force = sum(float(g.pow(2).sum()) for g in grads) ** 0.5
                if iters == 0:
                    force0 = force
                res = force / (force0 + 1e-30)
                if res <= c.settle_tol or force0 == 0.0 or iters >= c.settle_iters:
                    break
                iters += 1
                with torch.no_grad():
                    prev_e, prev_h = energy.detach(), [h.detach() for h in hs]
                    run = run + 1
                    vel = [c.settle_momentum * v + g for v, g in zip(vel, grads, strict=True)]
                    hs = [h - lr * v for h, v in zip(hs, vel, strict=True)]
                    if noise > 0:
                        hs = [h + (2 * lr).sqrt() * noise * self.randn(*h.shape) for h in hs]
        return [h.detach() for h in hs], iters, res

    def credits_from(self, x: Tensor, hs: list[Tensor]) -> list[Tensor]:
        pi = self.precision().detach()
        b = hs[-1].shape[0]
        w = self.cfg.output_weight
        with torch.no_grad():
            return [-pi[i] * eps / (w * b) for i, eps in enumerate(self.errors(x, hs))]

    @torch.no_grad()
    def error_power(self, x: Tensor, hs: list[Tensor]) -> Tensor:
        """m_l: mean squared prediction error per layer."""
        return torch.stack([eps.pow(2).mean() for eps in self.errors(x, hs)])

    def learn_precisions(self, x: Tensor, hs: list[Tensor]) -> Tensor:
        """One SGD step on the precisions' free energy (module docstring); returns m_l."""
        c = self.cfg
        m = self.error_power(x, hs)
        if c.precision_lr > 0:
            with torch.enable_grad():
                pi = self.precision()
                free = (0.5 * pi * m - 0.5 * torch.log(pi) + c.precision_prior_rate * pi).sum()
                damp = 0.5 * c.precision_damping * (self.r - self.r_bar).pow(2).sum()
                self.opt.zero_grad(set_to_none=False)
                (free + damp).backward()
            self.opt.step()
            with torch.no_grad():
                self.r_bar.mul_(c.precision_ema).add_((1 - c.precision_ema) * self.r)
        return m

    # --- protocol --------------------------------------------------------------------------
    def _step(self, x: Tensor, y: Tensor, learn: bool) -> dict[str, float]:
        """Settle once; write the weight update; then (if ``learn``) step the precisions on the
        same settled errors."""
        c = self.cfg
        hs, iters, res = self.settle(x, y, noise=c.noise_std * c.noise_anneal**self.epoch)
        clamped = apply_credit(self.net, x, hs, self.credits_from(x, hs), y)
        m = self.learn_precisions(x, hs) if learn else self.error_power(x, hs)
        names = self.net.layer_names()
        # Logged as the loop's own residual, not ``residual``: that key is a fixed-point map's
        # relative step (EP, eqt; gated at 1e-2 by residual_growth), while this one is the
        # fraction of the clamp's initial force left, whose tolerance is settle_tol (2e-2).
        stats = {"loss": self.last_ff_loss, "term/clamped_loss": float(clamped),
                 "settle/inference/iters": float(iters), "settle/inference/residual": res,
                 "settle/inference/tol": c.settle_tol,
                 "settle/inference/cap": float(c.settle_iters)}
        pis = self.precision().detach()
        for i, n in enumerate(names):
            stats[f"precision/{n}"] = float(pis[i])
            stats[f"term/pred_error/{n}"] = float(m[i])
        return {**stats, **grad_norms(self.net), **act_rms(names, hs)}

    def update(self, x: Tensor, y: Tensor) -> dict[str, float]:
        return self._step(x, y, learn=True)

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        return self._step(x, y, learn=False)

    def learn(self, x: Tensor, y: Tensor) -> dict[str, float]:
        hs, _, _ = self.settle(x, y)
        self.learn_precisions(x, hs)
        return {}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        hs, _, _ = self.settle(x, y)
        return self.credits_from(x, hs)


def calibrate_pc(rule: PC, x: Tensor, y: Tensor,
                 step_sizes: Sequence[float] = (0.4, 0.2, 0.1, 0.05)) -> dict[str, float]:
    """Largest settling step whose settling reaches the rule's tolerance within its iteration
    cap at initialisation; sets settle_lr. Raises if none does (energy or tolerance wrong)."""
    old = rule.cfg
    for lr in sorted(step_sizes, reverse=True):
        rule.cfg = old.model_copy(update={"settle_lr": lr})
        _, iters, res = rule.settle(x, y)
        if res <= rule.cfg.settle_tol:
            return {"settle_lr": lr, "settle_iters": float(iters), "residual": res}
    rule.cfg = old
    raise RuntimeError(f"PC settling reached tol={rule.cfg.settle_tol} within "
                       f"{rule.cfg.settle_iters} iterations for none of the step sizes "
                       f"{list(step_sizes)}")
