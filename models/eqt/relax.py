"""Free phase: the damped relaxation z <- z + eps F(z) to the fixed point z* (METHODS §2).

Run T1 steps, then continue in chunks until the relative residual res = |eps F(z)| / |z| (one
extra relaxation step, log 003 §stab) is at most ``res_target`` or ``t1max`` steps were taken.
``differentiable=True`` keeps the autograd graph of exactly T1 steps (the BPTT control).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.config.eqt import RelaxConfig

__all__ = ["RelaxConfig", "RelaxResult", "relax", "relative_residual"]

Force = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RelaxResult:
    z: torch.Tensor          # the state returned (z* for the free phase)
    z_t1: torch.Tensor       # the state after exactly T1 steps (what resreg penalises)
    residual: float          # res at z
    residual_t1: float       # res at z_t1
    steps: int               # relaxation steps applied
    trace: list[float] = field(default_factory=list)  # res before every step, then at z


def relative_residual(f: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    return (eps * f).norm() / z.norm().clamp_min(torch.finfo(z.dtype).tiny)


def relax(force: Force, z0: torch.Tensor, cfg: RelaxConfig,
          differentiable: bool = False) -> RelaxResult:
    """Relax from z0. Without ``differentiable`` the loop runs under no_grad and may extend past
    T1; with it, exactly T1 steps are kept in the graph (BPTT differentiates the finite unroll,
    converged or not)."""
    z = z0 if differentiable else z0.detach()
    trace: list[torch.Tensor] = []
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for _ in range(cfg.t1):
            f = force(z)
            trace.append(relative_residual(f.detach(), z.detach(), cfg.eps))
            z = z + cfg.eps * f
    z_t1 = z
    with torch.no_grad():
        f = force(z.detach())
        res = relative_residual(f, z.detach(), cfg.eps)
        res_t1 = float(res) if torch.isfinite(z).all() else math.inf
        steps = cfg.t1
        if not differentiable:
            while math.isfinite(float(res)) and float(res) > cfg.res_target and steps < cfg.t1max:
                for _ in range(min(cfg.chunk, cfg.t1max - steps)):
                    trace.append(res)
                    z = z + cfg.eps * f
                    f = force(z)
                    res = relative_residual(f, z, cfg.eps)
                    steps += 1
        trace.append(res)
    res_f = float(res) if torch.isfinite(z).all() else math.inf
    return RelaxResult(z=z, z_t1=z_t1, residual=res_f, residual_t1=res_t1, steps=steps,
                       trace=[float(r) for r in trace])
