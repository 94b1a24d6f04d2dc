"""Gradient-quality and operator diagnostics for the equilibrium LM (METHODS §2).

Cosines are per parameter group (``block.param_group``) and global; k = |g|/|g_ref|; batch
self-coherence is the global cosine between one rule's gradients on two batches (the log's
plateau signature: EP self-cos -0.27 while BPTT stayed +0.96). The numerical abscissa is the
leading eigenvalue of (J + J^T)/2 of the full force, by matrix-free power iteration: residual,
not spectral radius, is the health signal (J is non-normal), and the abscissa bounds transient
growth.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch.func import jvp, vjp

from models.eqt.block import param_group

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM
    from models.eqt.step import RuleConfig

Grads = Mapping[str, torch.Tensor]


def _dot(a: Grads, b: Grads, names: Iterable[str]) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in names)


def cosine(a: Grads, b: Grads, names: Iterable[str] | None = None) -> float:
    """Cosine between two gradient dicts over ``names`` (all of ``a`` by default)."""
    names = list(a if names is None else names)
    den = (_dot(a, a, names) * _dot(b, b, names)).sqrt()
    return float(_dot(a, b, names) / den) if den > 0 else float("nan")


def norm_ratio(a: Grads, b: Grads) -> float:
    """k = |a| / |b| over all parameters."""
    return float((_dot(a, a, a) / _dot(b, b, b)).sqrt())


def grad_cosines(g: Grads, g_ref: Grads) -> dict[str, float]:
    """``cos/<group>`` for every diagnostic group, ``cos/global`` and ``norm_ratio``."""
    groups: dict[str, list[str]] = {}
    for n in g:
        groups.setdefault(param_group(n), []).append(n)
    out = {f"cos/{grp}": cosine(g, g_ref, names) for grp, names in sorted(groups.items())}
    out["cos/global"] = cosine(g, g_ref)
    out["norm_ratio"] = norm_ratio(g, g_ref)
    return out


def self_coherence(g_batch1: Grads, g_batch2: Grads) -> float:
    """Batch-to-batch cosine of one rule's gradients; negative means an incoherent estimator."""
    return cosine(g_batch1, g_batch2)


@torch.no_grad()
def numerical_abscissa(model: EquilibriumLM, idx: torch.Tensor, z: torch.Tensor | None = None,
                       iters: int = 500, tol: float = 1e-10, seed: int = 0) -> float:
    """Leading eigenvalue of S = (J + J^T)/2, J = dF/dz at z (default: the free fixed point).

    Two power iterations: the first gives the spectral radius rho of S, the second runs on
    S + rho I (positive semidefinite), whose top eigenvalue minus rho is the abscissa.
    """
    x_in = model.x_in(idx)
    z = model.free_phase(idx).z if z is None else z.detach()

    def force(u: torch.Tensor) -> torch.Tensor:
        return model.force(u, x_in)

    _, pullback = vjp(force, z)

    def sym(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (jvp(force, (z,), (v,))[1] + pullback(v)[0])

    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)

    def power(shift: float) -> float:
        v = start / start.norm()
        value = 0.0
        for _ in range(iters):
            w = sym(v) + shift * v
            new = float((v * w).sum())
            v = w / w.norm()
            if abs(new - value) <= tol * max(abs(new), 1.0):
                return new
            value = new
        return value

    rho = abs(power(0.0))
    return power(rho) - rho


def fingerprint(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
                rule_cfg: RuleConfig,
                val: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The log's 4-number operator fingerprint: residual, cos(rule, BPTT), abscissa, val CE."""
    from models.eqt.bptt import bptt_gradients
    from models.eqt.step import gradients

    g, stats = gradients(model, idx, targets, rule_cfg)
    g_ref, _, _ = bptt_gradients(model, idx, targets)
    ces = [float(model.loss(x, y)) for x, y in val]
    return {"residual": stats["residual"], "cos": cosine(g, g_ref),
            "abscissa": numerical_abscissa(model, idx), "val_ce": sum(ces) / len(ces)}
