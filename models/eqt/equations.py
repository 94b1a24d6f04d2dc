"""The equations of the equilibrium model and its rules, once, as small pure functions on tensors.

Both executions use these: the eager modules (``block``, ``relax``, ``ep``, ``stabilisers``) in a
Python loop and the fast path (``fast``) inside CUDA graphs / ``torch.compile``, which trace the
same arithmetic. Each function is written in the order of operations the committed results were
made with, so both paths round alike (and a change here changes both).

    force        F(z) = -(z - x_in) + h(z) - c z           (h: attention + FFN, METHODS §2)
    relax step   z' = z + eps F(z)
    residual     res = |eps F(z)| / |z|
    adjoint step lam' = lam + eps (J_h^T lam - (1 + c) lam)  (the transposed iteration: BPTT's
                 backward step, the differential mode of tracking-AEP)
    contrast     a = -Re[(1/(N r)) sum_k w_k (z_k - z*)]    (EP's estimate of the adjoint)
    objective    <a, F(z*)> + l(z*)                        (its theta-gradient is EP's update)
    jacreg       |J_h v|^2 / numel for a probe v           (Hutchinson, |J_h|_F^2 / numel)
    resreg       |eps F(z_T1)|^2 / (|z_T1|^2 + eps)
    tail         rel_inc r / (1 - r)                       (the nudged phase's remaining change)
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def force(z: Tensor, x_in: Tensor, h: Tensor, c: float) -> Tensor:
    """F(z) = -(z - x_in) + h(z) - c z, given the interaction h = h(z)."""
    return -(z - x_in) + h - c * z


def relax_step(z: Tensor, f: Tensor, eps: float) -> Tensor:
    return z + eps * f


def relative_residual(f: Tensor, z: Tensor, eps: float) -> Tensor:
    """|eps F(z)| / |z| (the step's size relative to the state)."""
    return (eps * f).norm() / z.norm().clamp_min(torch.finfo(z.dtype).tiny)


def adjoint_step(lam: Tensor, jt_lam: Tensor, eps: float, c: float) -> Tensor:
    """lam + eps (J_h^T lam - (1 + c) lam), given J_h^T lam."""
    return lam + eps * (jt_lam - (1 + c) * lam)


def nudged_force(f: Tensor, grad_l: Tensor, beta: Tensor, scale: float) -> Tensor:
    """F(z) - beta scale dl/dz: a nudged phase's force (``scale``: the loss's normalisation)."""
    return f - beta * scale * grad_l


def two_phase_split(z: Tensor) -> tuple[Tensor, Tensor]:
    """(zbar, d) of two stacked phases z = [z+, z-]: zbar = (z+ + z-)/2, d = z+ - zbar."""
    z_p, z_m = z.chunk(2)
    zbar = 0.5 * (z_p + z_m)
    return zbar, z_p - zbar


def minus_pm(f: Tensor, corr: Tensor) -> Tensor:
    """f - [corr, -corr]: a correction linear in d = +-(z+- - zbar) applied to both phases."""
    return f - torch.cat([corr, -corr])


def contrast(z: Tensor, z_star: Tensor, weights: Tensor, r: float, n_phase: int) -> Tensor:
    """a = -Re[(1/(N r)) sum_k w_k (z_k - z*)] for phases stacked along the batch dim."""
    d = (z - z_star.repeat(n_phase, 1, 1)).unflatten(0, (n_phase, -1))
    s = (weights.view(-1, 1, 1, 1) * d).sum(0) / (n_phase * r)
    return -(s.real if s.is_complex() else s)


def contrast_objective(a: Tensor, f: Tensor, ce: Tensor) -> Tensor:
    """<a, F(z*)> + l(z*): its gradient in theta (a, z* held fixed) is EP's update."""
    return (a * f).sum() + ce


def jacreg(jv: Tensor) -> Tensor:
    """|J_h v|^2 / numel: Hutchinson's estimate of |J_h|_F^2 / numel for a unit-variance probe."""
    return jv.pow(2).sum() / jv.numel()


def resreg(f: Tensor, z: Tensor, eps: float) -> Tensor:
    """|eps F(z)|^2 / (|z|^2 + eps) at the state after T1 steps (log 003, eq. resreg)."""
    return (eps * f).pow(2).sum() / (z.pow(2).sum() + eps)


def geometric_tail(rel_inc: Tensor | float, r: Tensor | float) -> Tensor | float:
    """rel_inc r / (1 - r): the rest of a series whose increments shrink by r per snapshot."""
    return rel_inc * r / (1 - r)
