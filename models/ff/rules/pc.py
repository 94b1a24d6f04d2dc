"""Predictive coding with learned, floored, damped precisions and settling inference.

Energy of one sample (x clamped at the bottom, h_{-1} := x, f_l the net's layer l):

    E(h) = sum_l pi_l / 2 * ||h_l - f_l(h_{l-1})||^2  +  beta * loss(head(h_L), y)

The last term clamps the output to the target y under the task likelihood (CE or MSE): for a
softmax classifier there is no "target logit vector", so clamping the output node to y is this
energy. Inference settles all h_l (from the feed-forward pass) by gradient descent on the batch
sum of E with step gamma / max_l pi_l (a preconditioner: the fixed point is unchanged but the
step stays stable as precisions grow), optionally with Langevin noise sqrt(2 gamma') sigma_e xi
annealed per epoch
(sigma_e = noise_std * noise_anneal^epoch; log 001 "noise injection ... gradually reduced"),
until the relative residual ||gamma dE/dh|| / ||h|| <= settle_tol or settle_iters.

At equilibrium pi_l eps_l = J_{l+1}^T pi_{l+1} eps_{l+1} and pi_L eps_L = -beta dloss/dh_L, so
-pi_l eps_l / beta is the BP gradient in the small-error limit (beta -> 0); that is the credit,
divided by the batch size to match the batch-mean loss. Weights update locally from the settled
errors: dE/dtheta_l = -pi_l eps_l df_l/dtheta_l (in ``p.grad``, over beta B). Without the clamp
(evaluation) the feed-forward pass is the equilibrium, so ``evaluate`` is the plain forward.

Precision pi_l = floor + softplus(r_l) (one scalar per layer). r minimises the Gaussian free
energy mean_batch[pi ||eps||^2 / 2] - (d/2) log pi (optimum 1 / error variance); the floor keeps
the net from muting its own errors (log 001) and a damping term kappa/2 (r - r_bar)^2 towards a
slow EMA r_bar stops adjacent precisions from oscillating and diverging late (log 000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms
from models.ff.rules.base import Rule


@dataclass
class PCConfig:
    beta: float = 1.0  # weight of the clamped output term
    settle_lr: float = 0.1  # gamma
    settle_iters: int = 20  # maximum settling steps (log 001: 30-40 early, 5-6 trained)
    settle_tol: float = 1e-4  # relative-residual equilibrium tolerance
    precision_init: float = 1.0
    precision_floor: float = 0.1
    precision_lr: float = 1e-3  # 0 freezes the precisions
    precision_damping: float = 1.0  # kappa
    precision_ema: float = 0.99  # r_bar <- ema * r_bar + (1 - ema) * r
    noise_std: float = 0.0
    noise_anneal: float = 0.9  # per-epoch factor on the settling noise
    seed: int = 0


def _inv_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))


class PC(Rule):
    name = "pc"

    def __init__(self, net: DeepMLP, cfg: PCConfig | None = None) -> None:
        super().__init__(net, cfg or PCConfig())
        self.net: DeepMLP = net
        c = self.cfg
        if c.precision_init <= c.precision_floor:
            raise ValueError("precision_init must exceed precision_floor")
        r0 = _inv_softplus(c.precision_init - c.precision_floor)
        n = len(net.layer_names())
        self.r = nn.Parameter(torch.full((n,), r0, dtype=self.dtype, device=self.device))
        self.r_bar = torch.full((n,), r0, dtype=self.dtype, device=self.device)
        self.opt = torch.optim.SGD([self.r], lr=c.precision_lr)

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
        """Batch sum of E (per-sample dynamics do not depend on the batch size)."""
        e = sum(0.5 * pi[i] * eps.pow(2).sum() for i, eps in enumerate(self.errors(x, hs)))
        out = self.net.readout(hs[-1])
        return e + self.cfg.beta * self.net.per_sample_loss(out, y).sum()

    def settle(self, x: Tensor, y: Tensor, noise: float = 0.0) -> tuple[list[Tensor], int, float]:
        """Settled states, iterations used, final relative residual."""
        c = self.cfg
        pi = self.precision().detach()
        lr = c.settle_lr / float(pi.max())  # preconditioning: same fixed point, stable for any pi
        with torch.no_grad():
            hs = self.net.states(x)
        iters, res = 0, 0.0
        with torch.enable_grad():
            while iters < c.settle_iters:
                iters += 1
                hs = [h.detach().requires_grad_(True) for h in hs]
                grads = torch.autograd.grad(self.energy(x, hs, y, pi), hs)
                with torch.no_grad():
                    step = [lr * g for g in grads]
                    num = sum(float(s.pow(2).sum()) for s in step) ** 0.5
                    den = sum(float(h.pow(2).sum()) for h in hs) ** 0.5
                    res = num / (den + 1e-12)
                    hs = [h - s for h, s in zip(hs, step, strict=True)]
                    if noise > 0:
                        amp = math.sqrt(2 * lr) * noise
                        hs = [h + amp * self.randn(*h.shape) for h in hs]
                if res <= c.settle_tol:
                    break
        return [h.detach() for h in hs], iters, res

    def credits_from(self, x: Tensor, hs: list[Tensor]) -> list[Tensor]:
        pi = self.precision().detach()
        b = hs[-1].shape[0]
        with torch.no_grad():
            return [-pi[i] * eps / (self.cfg.beta * b) for i, eps in enumerate(self.errors(x, hs))]

    # --- protocol --------------------------------------------------------------------------
    def update(self, x: Tensor, y: Tensor) -> dict[str, float]:
        c = self.cfg
        hs, iters, res = self.settle(x, y, noise=c.noise_std * c.noise_anneal**self.epoch)
        loss = apply_credit(self.net, x, hs, self.credits_from(x, hs), y)
        with torch.no_grad():
            err_sq = torch.stack([eps.pow(2).mean() for eps in self.errors(x, hs)])
        if c.precision_lr > 0:
            pi = self.precision()
            d = hs[0].shape[-1]
            free = (0.5 * pi * err_sq * d - 0.5 * d * torch.log(pi)).sum() / d
            damp = 0.5 * c.precision_damping * (self.r - self.r_bar).pow(2).sum()
            self.opt.zero_grad(set_to_none=False)
            (free + damp).backward()
            self.opt.step()
            with torch.no_grad():
                self.r_bar.mul_(c.precision_ema).add_((1 - c.precision_ema) * self.r)
        names = self.net.layer_names()
        stats = {"loss": float(loss), "settle_iters": float(iters), "residual": res,
                 "settle/inference/tol": c.settle_tol, "settle/inference/cap": float(c.settle_iters)}
        pis = self.precision().detach()
        for i, n in enumerate(names):
            stats[f"precision/{n}"] = float(pis[i])
            stats[f"term/pred_error/{n}"] = float(err_sq[i])
        return {**stats, **grad_norms(self.net), **act_rms(names, hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        hs, _, _ = self.settle(x, y)
        return self.credits_from(x, hs)
