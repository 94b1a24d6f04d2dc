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
from torch.utils.checkpoint import checkpoint

from models.config.eqt import RelaxConfig
from models.eqt.equations import relative_residual, relax_step

__all__ = ["RelaxConfig", "RelaxResult", "relax", "relative_residual"]

Force = Callable[[torch.Tensor], torch.Tensor]

# A differentiable unroll of at least this many state elements x steps keeps only every
# ``cfg.chunk``-th state and recomputes the steps between in the backward pass (segment
# checkpointing, as the fast path's BPTT does; same gradients, one extra forward): the eager BPTT
# at log 003's shape needed 27.9 GB on an H200 for T1 = 150, 2.1 GB so (bench/results_h200), and
# the cosine reference unrolls ~1,300 steps. On a CPU glibc's heap still fragments around the
# graph nodes that outlive each step (4 x 256 x 128, 200 steps, threshold forced to 0: 3.7 GB
# whole, 1.4 GB so).
CHECKPOINT_ELEMENTS = 2**27


@dataclass
class RelaxResult:
    z: torch.Tensor          # the state returned (z* for the free phase)
    z_t1: torch.Tensor       # the state after exactly T1 steps (what resreg penalises)
    residual: float          # res at z
    residual_t1: float       # res at z_t1
    steps: int               # relaxation steps applied
    trace: list[float] = field(default_factory=list)  # res before every step, then at z


def _unroll(force: Force, z: torch.Tensor, n: int, eps: float,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` relaxation steps from z; the residual before each (no side effects: a checkpointed
    segment runs twice)."""
    res = []
    for _ in range(n):
        f = force(z)
        res.append(relative_residual(f.detach(), z.detach(), eps))
        z = relax_step(z, f, eps)
    return z, torch.stack(res)


def relax(force: Force, z0: torch.Tensor, cfg: RelaxConfig,
          differentiable: bool = False) -> RelaxResult:
    """Relax from z0. Without ``differentiable`` the loop runs under no_grad and may extend past
    T1; with it, exactly T1 steps are kept in the graph (BPTT differentiates the finite unroll,
    converged or not)."""
    z = z0 if differentiable else z0.detach()
    trace: list[torch.Tensor] = []
    grad = differentiable and torch.is_grad_enabled()
    segmented = grad and cfg.chunk < cfg.t1 and z.numel() * cfg.t1 >= CHECKPOINT_ELEMENTS
    size = cfg.chunk if segmented else cfg.t1
    with torch.set_grad_enabled(grad):
        for start in range(0, cfg.t1, size):
            n = min(size, cfg.t1 - start)
            z, res = (checkpoint(_unroll, force, z, n, cfg.eps, use_reentrant=False)
                      if segmented else _unroll(force, z, n, cfg.eps))
            trace += list(res)
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
                    z = relax_step(z, f, cfg.eps)
                    f = force(z)
                    res = relative_residual(f, z, cfg.eps)
                    steps += 1
        trace.append(res)
    res_f = float(res) if torch.isfinite(z).all() else math.inf
    return RelaxResult(z=z, z_t1=z_t1, residual=res_f, residual_t1=res_t1, steps=steps,
                       trace=[float(r) for r in trace])
