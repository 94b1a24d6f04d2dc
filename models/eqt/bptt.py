"""BPTT control: the exact gradient of the loss at the end of the T1-step unroll (METHODS §2).

It differentiates the finite unroll whether or not it converged, so it equals the implicit
gradient only when the unroll has converged (log 003 §stab: "BPTT has no such threshold").
Converged means both ways: the forward pass at the fixed point *and* the backward pass, whose
reverse recursion lam <- (I + eps J^T) lam at z* is the Neumann series of the adjoint. When
training weakens the contraction to ~0.99 per step, a 150-step unroll whose forward residual is
already below res_target still leaves 0.99^150 = 22% of that series out (reports/gpu-short:
cos(BPTT-150, implicit) = 0.845 at one checkpoint). ``reference_steps`` sizes an unroll whose
backward pass converges too: the cosine checkpoints' reference.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from models.eqt.relax import RelaxResult

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


def bptt_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                   steps: int | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float], RelaxResult]:
    """Backprop through z <- z + eps F(z), T1 steps from x_in (or ``steps``: the converged
    reference of ``reference_steps``); returns grads, stats, the unroll."""
    cfg = model.relax_cfg
    if steps is not None:
        cfg = cfg.model_copy(update={"t1": steps, "t1max": max(steps, cfg.t1max)})
    with torch.enable_grad():
        run = model.free_phase(idx, differentiable=True, relax_cfg=cfg)
        loss = model.ce(run.z, targets)
        names, params = zip(*model.named_parameters(), strict=True)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
    grads = {n: torch.zeros_like(p) if g is None else g
             for n, p, g in zip(names, params, gs, strict=True)}
    run.z, run.z_t1 = run.z.detach(), run.z_t1.detach()
    stats = {"loss": loss.item(), "term/ce": loss.item(), "residual": run.residual,
             "settle_iters": float(run.steps)}
    return grads, stats, run


def reference_steps(free_steps: int, adjoint_iters: float, cap: int) -> int:
    """Length of a BPTT unroll converged in both passes: the free phase's steps to res_target
    plus the iterations the implicit adjoint needed to reach its tolerance (the same recursion
    as the unroll's backward pass at z*), at most ``cap``."""
    return int(min(free_steps + math.ceil(adjoint_iters), cap))
