"""Exact reference: the implicit-function-theorem gradient at the fixed point.

At F(z*; theta) = 0, dL/dtheta = <a, dF/dtheta> + dl/dtheta with the adjoint a solving
J^T a = -dl/dz (J = dF/dz at z*). a is found matrix-free by the damped iteration
a <- a + eps (J^T a + dl/dz), which contracts exactly when the free phase does (I + eps J^T has
the spectrum of I + eps J), else by BiCGSTAB in float64 (slow contraction, or a z* that the
free phase's iteration does not hold). Unlike BPTT through a finite unroll, this is the gradient
EP estimates (beta -> 0, converged free phase), so it is the clean reference for EP tests.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.func import vjp

from models.config.eqt import StabiliserConfig
from models.eqt.ep import contrast_gradients
from models.eqt.relax import RelaxResult

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


@dataclass(frozen=True)
class ImplicitConfig:
    tol: float = 1e-10
    max_iter: int = 5000
    stab: StabiliserConfig = field(default_factory=StabiliserConfig)


# The damped iteration has diverged once its residual is this many times its best, and ends
# growing when its last residual is this many times its best.
DIVERGED, GROWING = 1e3, 1.5


@torch.no_grad()
def adjoint(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor, z_star: torch.Tensor,
            cfg: ImplicitConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Solve J^T a = -dl/dz at z*; raises if neither solver reaches ``cfg.tol``.

    The damped (Neumann) iteration first: its iteration count is the number of reverse steps a
    BPTT unroll needs at z* (``models.eqt.bptt.reference_steps``). When contraction is too slow
    for it (GPU protocol: > 3,000 iterations at every checkpoint of one run), or the iteration
    grows because z* is not stable under the free phase's own iteration (``adjoint_unstable``:
    a residual of 1e-5 after T1 steps is no proof of stability), BiCGSTAB solves the same
    matrix-free system in float64, from the best damped iterate. In float32 it stagnates near
    the tolerance on these systems, and started from the last (diverged) iterate it ended at
    1e14 on a CPU case at the GPU protocol's shape (reports/gpu-short, 7e9afa4: two checkpoints
    had no reference at all). ``adjoint_iters`` is then absent and ``adjoint_solver`` (0
    damped, 1 BiCGSTAB) says which solved it."""
    eps = model.relax_cfg.eps
    pullback, g = _adjoint_system(model, idx, targets, z_star)
    a = best = -g
    it, rel, best_rel = 0, float("inf"), float("inf")
    for it in range(1, cfg.max_iter + 1):
        r = pullback(a) + g
        rel = float(r.norm() / g.norm())
        if rel <= cfg.tol:
            return a, {"adjoint_iters": float(it), "adjoint_residual": rel,
                       "adjoint_solver": 0.0, "adjoint_unstable": 0.0}
        if rel < best_rel:
            best, best_rel = a, rel
        elif not rel < DIVERGED * best_rel:  # growing (or not finite): z* is not contractive
            break
        a = a + eps * r
    del pullback
    # unstable: diverged, or ended 1.5x above its best (a slowly growing mode ran out of steps;
    # judged only well above the tolerance, where rounding noise cannot move the residual 1.5x)
    growing = (not rel < DIVERGED * best_rel if it < cfg.max_iter
               else best_rel > 100 * cfg.tol and not rel < GROWING * best_rel)
    stats = {"adjoint_neumann_residual": best_rel,
             "adjoint_unstable": float(growing and math.isfinite(best_rel))}
    a, rel, products = _bicgstab_float64(model, idx, targets, z_star, best, cfg)
    if rel <= cfg.tol:
        return a, {**stats, "adjoint_residual": rel, "adjoint_products": float(products),
                   "adjoint_solver": 1.0}
    raise AdjointNotSolved(
        f"implicit adjoint did not converge: relative residual {best_rel:.2e} > tol "
        f"{cfg.tol:.1e} after {it} damped iterations"
        f"{' (growing: z* is unstable)' if stats['adjoint_unstable'] else ''}, {rel:.2e} after "
        f"{products} float64 BiCGSTAB products (raise max_iter, or J is singular at z*)", stats)


class AdjointNotSolved(ValueError):
    """Neither solver reached the tolerance; ``stats`` keeps what the damped iteration saw
    (``adjoint_unstable``), so a checkpoint without a reference still says whether z* was
    stable."""

    def __init__(self, message: str, stats: dict[str, float]) -> None:
        super().__init__(message)
        self.stats = stats


def _bicgstab_float64(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                      z_star: torch.Tensor, a0: torch.Tensor, cfg: ImplicitConfig,
                      ) -> tuple[torch.Tensor, float, int]:
    """BiCGSTAB on J^T a = -dl/dz at z* with the model's weights in float64 (a copy unless they
    already are), from ``a0``; the adjoint comes back in z*'s dtype."""
    m64 = model  # a copy, not a new model: building one would draw from the global RNG
    if next(model.parameters()).dtype != torch.float64:
        m64 = copy.deepcopy(model).to(torch.float64)
        m64.zero_grad(set_to_none=True)
    pullback, g = _adjoint_system(m64, idx, targets, z_star.detach().to(torch.float64))
    a, rel, products = bicgstab(pullback, -g, a0.to(torch.float64), cfg.tol, cfg.max_iter)
    return a.to(z_star.dtype), rel, products


def _adjoint_system(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                    z_star: torch.Tensor,
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """J^T v (matrix-free, at z*) and dl/dz at z*: the system J^T a = -dl/dz, in z*'s dtype."""
    x_in = model.x_in(idx)
    _, pullback = vjp(lambda z: model.force(z, x_in), z_star)
    return (lambda v: pullback(v)[0]), model.ce_grad_z(z_star, targets)


def bicgstab(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor,
             tol: float, max_products: int) -> tuple[torch.Tensor, float, int]:
    """BiCGSTAB (van der Vorst 1992) for A x = b, matrix-free; returns (x, |b - A x| / |b|,
    matrix products used). Stops at ``tol``, at ``max_products`` or on a breakdown."""
    b_norm = float(b.norm())
    r = b - matvec(x)
    r_hat = r.clone()
    rho = alpha = omega = 1.0
    v, p = torch.zeros_like(b), torch.zeros_like(b)
    products, rel = 1, float(r.norm()) / b_norm
    while rel > tol and products + 2 <= max_products:  # two products per iteration
        rho_new = float((r_hat * r).sum())
        if rho_new == 0.0 or omega == 0.0:
            break
        p = r + (rho_new / rho) * (alpha / omega) * (p - omega * v)
        v = matvec(p)
        products += 1
        denom = float((r_hat * v).sum())
        if denom == 0.0 or not math.isfinite(denom):
            break
        alpha = rho_new / denom
        s = r - alpha * v
        t = matvec(s)
        products += 1
        tt = float((t * t).sum())
        omega = float((t * s).sum()) / tt if tt > 0 else 0.0
        x = x + alpha * p + omega * s
        r = s - omega * t
        rho = rho_new
        rel = float(r.norm()) / b_norm
    true_rel = float((b - matvec(x)).norm()) / b_norm  # the recursive residual drifts in fp32
    return x, true_rel, products + 1


def implicit_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                       cfg: ImplicitConfig | None = None, free: RelaxResult | None = None,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    cfg = cfg or ImplicitConfig()
    free = free if free is not None else model.free_phase(idx)
    if not free.residual <= model.relax_cfg.res_target:
        raise ValueError(f"implicit gradient needs a converged free phase: res {free.residual:.2e}"
                         f" > res_target {model.relax_cfg.res_target:.1e}")
    a, stats = adjoint(model, idx, targets, free.z, cfg)
    grads = contrast_gradients(model, idx, targets, free.z, a)
    with torch.no_grad():
        loss = model.ce(free.z, targets).item()
    stats.update({"loss": loss, "term/ce": loss, "residual": free.residual,
                  "settle_iters": float(free.steps)})
    return grads, stats


def reference_gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                        free: RelaxResult | None = None, tol: float = 1e-6,
                        ) -> tuple[dict[str, torch.Tensor] | None, dict[str, float | str]]:
    """The implicit gradient as a diagnostic reference at the model's own precision.

    BPTT differentiates exactly T1 steps, so it is the gradient EP estimates only when the
    unroll has converged; late in training the free phase often needs its continuation (steps >
    T1), and a cosine to BPTT then mixes the estimator's error with the reference's. The adjoint
    is solved to ``tol`` (fp32 cannot reach the tests' 1e-10) within 10 t1max iterations; a free
    phase above res_target or an adjoint that does not converge gives None and the reason.
    """
    cfg = ImplicitConfig(tol=tol, max_iter=10 * model.relax_cfg.t1max)
    try:
        return implicit_gradients(model, idx, targets, cfg, free)
    except AdjointNotSolved as err:
        return None, {"reason": str(err), **err.stats}
    except ValueError as err:
        return None, {"reason": str(err)}
