"""Energy-based (Hopfield-like) MLP for equilibrium propagation (Scellier & Bengio 2017).

EP needs a net whose inference *is* energy minimisation, which the feed-forward pre-LN MLP is
not (its forward map has no symmetric energy), so EP trains this net instead. With s_0 = x
clamped, free layers s_1..s_N and rho a bounded nonlinearity, per sample:

    E(s) = sum_k ||s_k||^2 / 2 - sum_k rho(s_k) . (W_k rho~(s_{k-1}) + b_k),   rho~(s_0) = x

The readout logits = W_out rho(s_N) + b_out is a plain layer (Laborieux et al. 2021): it enters
the nudged energy through beta * loss but not E, so the free state does not depend on it.

Inference: projected gradient descent s <- P(s - dt dF/ds), F = E + beta * loss, from s = 0 for
at most ``free_steps`` steps, stopping once the relative residual ||s_new - s|| / ||s|| <= ``tol``.
With the hard sigmoid, P clips every state to [0, 1] as Scellier & Bengio (2017) do: outside the
box rho is flat, so the unprojected dynamics of a unit past the kink see a different force on
each side of it and chatter (residual stuck at 0.2 in issue 13); on the box the energy is a
smooth quadratic and the projected descent converges. Smooth activations are not projected.

Initialisation. On the box the energy is a quadratic with Hessian I - C, C the symmetric
layer-to-layer coupling. At PyTorch's default scale a stack of four 64-wide layers has ||C|| > 1:
the energy is not convex, the free phase crawls along the box (residual 6e-4 after 150 steps) and
EP's fixed-point assumption fails. Halving the coupling weights at init (``coupling_init``) keeps
I - C positive definite and the same stack relaxes to 1e-7 in 50 steps; training is free to grow
them, and the residual is logged every step.

The free phase's solver (``momentum``). Training makes the energy non-convex within a hundred
steps (||C|| 0.56 -> 2.0 for that stack): its minima are ill-conditioned, and plain projected
descent at dt = 0.5 needed ~750 steps to reach tol = 1e-5 on a trained net; at a cap of 150 it
stopped at residual ~4e-4 on 90% of the steps (the settling-at-cap and residual-growth
findings of issue 13). Heavy-ball momentum 0.9 with a per-sample adaptive restart (``relax``)
reaches the same minimum (energy -44.409 vs -44.410 on a batch of 100) in ~150 steps, and every
logged step of the default study meets the tolerance. Exact block minimisation (odd layers,
then even ones: s_k = clip(drive_k)) converges as fast on the hard sigmoid, but momentum also
serves smooth activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ff.mlp import activation


def hardsigmoid01(z: Tensor) -> Tensor:
    return z.clamp(0.0, 1.0)


@dataclass
class EnergyMLPConfig:
    d_in: int
    d_out: int
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    act: str = "hardsigmoid"  # clamp(s, 0, 1) as in Scellier & Bengio; or any mlp.activation
    dt: float = 0.5
    free_steps: int = 60
    tol: float = 0.0  # 0: always run free_steps
    coupling_init: float = 0.5  # scale of the layer-to-layer weights at init (not x -> s_1)
    momentum: float = 0.0  # heavy ball of the free phase (0: plain projected descent)


class EnergyMLP(nn.Module):
    def __init__(self, cfg: EnergyMLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [cfg.d_in, *cfg.hidden]
        self.rho = hardsigmoid01 if cfg.act == "hardsigmoid" else activation(cfg.act)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:],
                                                                    strict=True))
        self.head = nn.Linear(cfg.hidden[-1], cfg.d_out)
        with torch.no_grad():  # see the module docstring: a convex energy at initialisation
            for layer in self.layers[1:]:
                layer.weight.mul_(cfg.coupling_init)

    def layer_names(self) -> list[str]:
        return [f"layer{i}" for i in range(1, len(self.layers) + 1)]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {n: list(m.parameters()) for n, m in zip(self.layer_names(), self.layers,
                                                           strict=True)}
        groups["head"] = list(self.head.parameters())
        return groups

    def sample_energy(self, x: Tensor, s: list[Tensor], y: Tensor | None = None,
                      beta: float = 0.0) -> Tensor:
        """F = E + beta * loss per sample, shape (B,) (samples relax independently)."""
        e = sum(0.5 * sk.pow(2).sum(-1) for sk in s)
        below = x
        for layer, sk in zip(self.layers, s, strict=True):
            r = self.rho(sk)
            e = e - (r * layer(below)).sum(-1)
            below = r
        if beta != 0.0 and y is not None:
            e = e + beta * self.per_sample_loss(self.readout(s[-1]), y)
        return e

    def energy(self, x: Tensor, s: list[Tensor]) -> Tensor:
        """Batch sum of E."""
        return self.sample_energy(x, s).sum()

    def readout(self, s_last: Tensor) -> Tensor:
        return self.head(self.rho(s_last))

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def total_energy(self, x: Tensor, s: list[Tensor], y: Tensor | None, beta: float) -> Tensor:
        return self.sample_energy(x, s, y, beta).sum()

    def project(self, s: list[Tensor]) -> list[Tensor]:
        """Clip to [0, 1] for the hard sigmoid (the box where rho is not flat); else identity."""
        return [t.clamp(0.0, 1.0) for t in s] if self.cfg.act == "hardsigmoid" else s

    def step(self, x: Tensor, s: list[Tensor], y: Tensor | None = None, beta: float = 0.0,
             currents: list[Tensor] | None = None, create_graph: bool = False) -> list[Tensor]:
        """One projected descent step on F - sum_k <currents_k, s_k>; ``s`` must require grad.

        ``currents`` (external inputs to each layer) and ``create_graph`` serve the reference
        gradient of models.studies.ff_common, which back-propagates through the unrolled phase.
        """
        f = self.total_energy(x, s, y, beta)
        if currents is not None:
            f = f - sum((c * t).sum() for c, t in zip(currents, s, strict=True))
        grads = torch.autograd.grad(f, s, create_graph=create_graph)
        return self.project([t - self.cfg.dt * g for t, g in zip(s, grads, strict=True)])

    def relax(self, x: Tensor, steps: int, y: Tensor | None = None, beta: float = 0.0,
              s0: list[Tensor] | None = None,
              momentum: float | None = None) -> tuple[list[Tensor], float]:
        """Projected descent on F; returns (states, last relative residual ||s_new - s||/||s||).

        ``momentum`` (default: the config's, the free phase's) adds a heavy-ball term with a
        per-sample adaptive restart: s' = P(s - dt dF/ds + mu (s - s_prev)), and a sample
        whose F would rise takes the plain step instead and drops its velocity (O'Donoghue &
        Candes 2015), so F never rises and the iteration stops at a minimum of F like the plain
        one. The nudged phases pass 0 (module docstring).
        """
        mu = self.cfg.momentum if momentum is None else momentum
        if s0 is None:
            s = [x.new_zeros(x.shape[0], d) for d in self.cfg.hidden]
        else:
            s = [t.detach() for t in s0]
        vel = [torch.zeros_like(t) for t in s]
        res = float("inf")
        with torch.enable_grad():
            for _ in range(steps):
                s_in = [t.detach().requires_grad_(True) for t in s]
                if mu == 0.0:
                    new = [t.detach() for t in self.step(x, s_in, y, beta)]
                else:
                    f = self.sample_energy(x, s_in, y, beta)
                    grads = torch.autograd.grad(f.sum(), s_in)
                    with torch.no_grad():
                        dt = self.cfg.dt
                        new = self.project([t + mu * v - dt * g
                                            for t, v, g in zip(s, vel, grads, strict=True)])
                        up = (self.sample_energy(x, new, y, beta) > f.detach())[:, None]
                        if bool(up.any()):
                            plain = self.project([t - dt * g for t, g in zip(s, grads,
                                                                             strict=True)])
                            new = [torch.where(up, p, n) for p, n in zip(plain, new,
                                                                          strict=True)]
                        vel = [torch.where(up, 0.0, n - t) for n, t in zip(new, s, strict=True)]
                num = sum(float((a - b).pow(2).sum()) for a, b in zip(new, s, strict=True))
                den = sum(float(t.pow(2).sum()) for t in new)
                res = (num / (den + 1e-24)) ** 0.5
                s = new
                if res <= self.cfg.tol:
                    break
        return s, res

    def states(self, x: Tensor) -> list[Tensor]:
        return self.relax(x, self.cfg.free_steps)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.states(x)[-1])
