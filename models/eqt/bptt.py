"""BPTT control: the exact gradient of the loss at the end of the T1-step unroll (METHODS §2).

It differentiates the finite unroll whether or not it converged, so it equals the implicit
gradient only when the unroll has converged (log 003 §stab: "BPTT has no such threshold").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.eqt.relax import RelaxResult

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


def bptt_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float], RelaxResult]:
    """Backprop through z <- z + eps F(z), T1 steps from x_in; returns grads, stats, the unroll."""
    with torch.enable_grad():
        run = model.free_phase(idx, differentiable=True)
        loss = model.ce(run.z, targets)
        names, params = zip(*model.named_parameters(), strict=True)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
    grads = {n: torch.zeros_like(p) if g is None else g
             for n, p, g in zip(names, params, gs, strict=True)}
    run.z, run.z_t1 = run.z.detach(), run.z_t1.detach()
    stats = {"loss": loss.item(), "term/ce": loss.item(), "residual": run.residual,
             "settle_iters": float(run.steps)}
    return grads, stats, run
