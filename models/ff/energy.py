"""Energy-based (Hopfield-like) MLP for equilibrium propagation (Scellier & Bengio 2017).

EP needs a net whose inference *is* energy minimisation, which the feed-forward pre-LN MLP is
not (its forward map has no symmetric energy), so EP trains this net instead. With s_0 = x
clamped, free layers s_1..s_N and rho a bounded nonlinearity, per sample:

    E(s) = sum_k ||s_k||^2 / 2 - sum_k rho(s_k) . (W_k rho~(s_{k-1}) + b_k),   rho~(s_0) = x

The readout logits = W_out rho(s_N) + b_out is a plain layer (Laborieux et al. 2021): it enters
the nudged energy through beta * loss but not E, so the free state does not depend on it.
Inference: gradient descent s <- s - dt dF/ds from s = 0 for ``free_steps`` steps (or until the
relative residual <= ``tol``), F = E + beta * loss.
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


class EnergyMLP(nn.Module):
    def __init__(self, cfg: EnergyMLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [cfg.d_in, *cfg.hidden]
        self.rho = hardsigmoid01 if cfg.act == "hardsigmoid" else activation(cfg.act)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:],
                                                                    strict=True))
        self.head = nn.Linear(cfg.hidden[-1], cfg.d_out)

    def layer_names(self) -> list[str]:
        return [f"layer{i}" for i in range(1, len(self.layers) + 1)]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {n: list(m.parameters()) for n, m in zip(self.layer_names(), self.layers,
                                                           strict=True)}
        groups["head"] = list(self.head.parameters())
        return groups

    def energy(self, x: Tensor, s: list[Tensor]) -> Tensor:
        """Batch sum of E."""
        e = sum(0.5 * sk.pow(2).sum() for sk in s)
        below = x
        for layer, sk in zip(self.layers, s, strict=True):
            r = self.rho(sk)
            e = e - (r * layer(below)).sum()
            below = r
        return e

    def readout(self, s_last: Tensor) -> Tensor:
        return self.head(self.rho(s_last))

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def total_energy(self, x: Tensor, s: list[Tensor], y: Tensor | None, beta: float) -> Tensor:
        e = self.energy(x, s)
        if beta != 0.0 and y is not None:
            e = e + beta * self.per_sample_loss(self.readout(s[-1]), y).sum()
        return e

    def relax(self, x: Tensor, steps: int, y: Tensor | None = None, beta: float = 0.0,
              s0: list[Tensor] | None = None) -> tuple[list[Tensor], float]:
        """Gradient descent on F; returns (states, last relative residual)."""
        if s0 is None:
            s = [x.new_zeros(x.shape[0], d) for d in self.cfg.hidden]
        else:
            s = [t.detach() for t in s0]
        res = float("inf")
        with torch.enable_grad():
            for _ in range(steps):
                s = [t.detach().requires_grad_(True) for t in s]
                grads = torch.autograd.grad(self.total_energy(x, s, y, beta), s)
                with torch.no_grad():
                    num = sum(float(g.pow(2).sum()) for g in grads) ** 0.5 * self.cfg.dt
                    den = sum(float(t.pow(2).sum()) for t in s) ** 0.5
                    res = num / (den + 1e-12)
                    s = [t - self.cfg.dt * g for t, g in zip(s, grads, strict=True)]
                if res <= self.cfg.tol:
                    break
        return [t.detach() for t in s], res

    def states(self, x: Tensor) -> list[Tensor]:
        return self.relax(x, self.cfg.free_steps)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.states(x)[-1])
