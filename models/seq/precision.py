"""Learned per-layer precision with a floor and a damping term (METHODS §3, logs 001 and 000).

pi_l = floor + softplus(r_l). r descends the Gaussian free energy of the layer's error signal

    F(r) = sum_l [ pi_l s_l / 2 - log(pi_l) / 2 ]  +  kappa / 2 * sum_l (r_l - r_bar_l)^2

with s_l the layer's mean squared error signal divided by its mean over layers (detached), so
the optimum pi_l = 1 / s_l weighs a layer by how weak its signal is relative to the others and
precisions stay O(1) whatever the absolute scale of the errors. The floor stops a layer from
muting its own errors (log 001's precision collapse); r_bar is a slow EMA of r and the damping
term keeps adjacent precisions from resonating and diverging late (log 000's 15k-step wall).
The gradient is closed-form (no autograd, no optimizer state): the state is (r, r_bar).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config.seq import PrecisionConfig


def inv_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))


def free_energy_grad(r: Tensor, r_bar: Tensor, s: Tensor, cfg: PrecisionConfig) -> Tensor:
    """dF/dr for the free energy above (pure; ``s`` the relative error signal per layer)."""
    pi = cfg.floor + F.softplus(r)
    return (0.5 * s - 0.5 / pi) * torch.sigmoid(r) + cfg.damping * (r - r_bar)


class Precision:
    """The precisions of ``n`` layers and their update."""

    def __init__(self, n: int, cfg: PrecisionConfig, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        r0 = inv_softplus(cfg.init - cfg.floor)
        self.r = torch.full((n,), r0, device=device, dtype=dtype)
        self.r_bar = self.r.clone()

    def values(self) -> Tensor:
        return self.cfg.floor + F.softplus(self.r)

    @torch.no_grad()
    def update(self, mean_sq: Tensor) -> None:
        """One damped step from the layers' mean squared error signals (any common scale)."""
        if self.cfg.lr == 0:
            return
        s = mean_sq / mean_sq.mean().clamp_min(1e-30)
        self.r -= self.cfg.lr * free_energy_grad(self.r, self.r_bar, s, self.cfg)
        self.r_bar.mul_(self.cfg.ema).add_((1 - self.cfg.ema) * self.r)

    def state_dict(self) -> dict[str, Any]:
        return {"r": self.r.clone(), "r_bar": self.r_bar.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.r.copy_(state["r"])
        self.r_bar.copy_(state["r_bar"])
