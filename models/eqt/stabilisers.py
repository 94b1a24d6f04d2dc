"""Stabilisers that keep the free phase contractive (METHODS §2, log 003 §stab, §resreg).

- jacreg: lambda |J_nc(z*)|_F^2 by Hutchinson, one jvp on a Gaussian probe, differentiated in
  theta (Bai et al. 2021). Normalised per state element, E|J e|^2 / numel(e), so lambda does
  not depend on B, T or C.
- ``JacregController``: lambda <- clip(lambda (res_EMA / target)^0.3, floor, max). The floor is
  load-bearing and must stay > 0: two lambda -> 0 runs in the log exploded while res read 0
  (eps F below ulp(z) froze the relaxation).
- resreg: R = |eps F(z_T1)|^2 / (|z_T1|^2 + eps) on the state after exactly T1 steps, z_T1
  detached, so only theta (incl. the embeddings through x_in) is pushed to shrink the residual
  that evaluation actually sees.
- validity gate: when res > gate the task update is skipped and only the stabilisers apply
  (applied in ``models.eqt.step.gradients``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.func import jvp

from models.config.eqt import StabiliserConfig
from models.eqt import equations as eq
from models.eqt.block import ThickBlock
from models.eqt.relax import RelaxResult
from models.eqt.thick_ops import ThickOps

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


class JacregController:
    """Residual-driven lambda controller on an EMA of the free-phase residual (log 003 §stab).

    Defaults from the log's recipes: lambda0 0.1, floor 0.1, max 16 (``--jr_max 16``),
    target 1.5e-3, EMA 0.9, exponent 0.3. A non-finite residual drives lambda to the max.

    With ``adjoint_target`` (EP rows) lambda also follows an EMA of the nudged phase's
    estimated remaining change after t2_max steps (``models.eqt.ep.remaining_change``):
    lambda <- lambda * max(res_EMA / target, tail_EMA / adjoint_target)^power. The forward
    residual alone can sit below target while the adjoint contracts at ~0.99 per step (GPU
    protocol at e0f532b: lambda at its floor for most steps while the nudged phase needed
    400-800 steps), because x_in starts the free phase with little weight on the slow modes
    that dl/dz excites.
    """

    def __init__(self, lam: float = 0.1, floor: float = 0.1, lam_max: float = 16.0,
                 target: float = 1.5e-3, ema: float = 0.9, power: float = 0.3,
                 adjoint_target: float | None = None) -> None:
        if not 0 < floor <= lam_max:
            raise ValueError(f"need 0 < floor <= lam_max (floor={floor}, lam_max={lam_max}); a "
                             "floor of 0 lets lambda anneal away and the operator explode")
        if target <= 0 or not 0 <= ema < 1:
            raise ValueError(f"need target > 0 and 0 <= ema < 1 (target={target}, ema={ema})")
        self.floor, self.lam_max, self.target = floor, lam_max, target
        self.ema, self.power, self.adjoint_target = ema, power, adjoint_target
        self.lam = min(max(lam, floor), lam_max)
        self.res_ema: float | None = None
        self.adj_ema: float | None = None

    @classmethod
    def from_config(cls, cfg: StabiliserConfig) -> JacregController:
        return cls(cfg.lam, cfg.floor, cfg.lam_max, cfg.target, cfg.ema, cfg.power,
                   cfg.adjoint_target)

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.ema * old + (1 - self.ema) * new

    def update(self, residual: float, adjoint_tail: float | None = None) -> float:
        """One step: ``residual`` (free phase) and, with ``adjoint_target``, this step's
        nudged tail after t2_max (None when no nudged phase ran: the gate was shut)."""
        if not math.isfinite(residual):
            self.lam = self.lam_max
            return self.lam
        self.res_ema = self._smooth(self.res_ema, residual)
        ratio = max(self.res_ema, 1e-30) / self.target
        if self.adjoint_target is not None and adjoint_tail is not None:
            # an unmeasured or non-finite tail counts as 100x the target, not as infinity (one
            # such step must not pin the EMA, and lambda, at the max for good)
            tail = min(adjoint_tail, 100 * self.adjoint_target)
            tail = tail if math.isfinite(tail) else 100 * self.adjoint_target
            self.adj_ema = self._smooth(self.adj_ema, tail)
        if self.adjoint_target is not None and self.adj_ema is not None:
            ratio = max(ratio, self.adj_ema / self.adjoint_target)
        self.lam = min(max(self.lam * ratio**self.power, self.floor), self.lam_max)
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "res_ema": self.res_ema, "adj_ema": self.adj_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = min(max(float(state["lam"]), self.floor), self.lam_max)
        self.res_ema = None if state["res_ema"] is None else float(state["res_ema"])
        adj = state.get("adj_ema")  # absent in checkpoints written before adjoint_target
        self.adj_ema = None if adj is None else float(adj)


def jacobian_penalty(model: EquilibriumLM, z: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate of |J_nc(z)|_F^2 / numel(z), differentiable in theta (z detached).

    For the thick block J v is the closed form of ``models.eqt.thick_ops.ThickOps``: differentiating
    ``torch.func.jvp`` through ``layer_norm`` in theta gives a wrong gradient (PyTorch 2.x; seen
    with qk-norm, whose LN input q depends on W_q: the q/k/ln1 jacreg gradients disagreed with
    finite differences), and the closed form is checked against both in the tests."""
    z = z.detach()
    probe = torch.randn_like(z)
    if isinstance(model.block, ThickBlock):
        jv = ThickOps(model.block).jvp(z, probe)
    else:
        _, jv = jvp(model.block.interaction, (z,), (probe,))
    return eq.jacreg(jv)


def residual_penalty(model: EquilibriumLM, idx: torch.Tensor, z_t1: torch.Tensor) -> torch.Tensor:
    """R = |eps F(z_T1)|^2 / (|z_T1|^2 + eps) with z_T1 detached (log 003, eq. resreg)."""
    eps = model.relax_cfg.eps
    z = z_t1.detach()
    f = model.force(z, model.x_in(idx))
    return eq.resreg(f, z, eps)


def stabiliser_gradients(model: EquilibriumLM, idx: torch.Tensor, free: RelaxResult,
                         cfg: StabiliserConfig, lam: float,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gradients of lam * jacreg(z*) + resreg * R(z_T1); empty dict when both are off."""
    stats: dict[str, float] = {"lambda": lam}
    total = None
    if lam > 0:
        jr = jacobian_penalty(model, free.z)
        stats["term/jacreg"] = jr.item()
        total = lam * jr
    if cfg.resreg > 0:
        rr = residual_penalty(model, idx, free.z_t1)
        stats["term/resreg"] = rr.item()
        total = cfg.resreg * rr if total is None else total + cfg.resreg * rr
    if total is None:
        return {}, stats
    names, params = zip(*model.named_parameters(), strict=True)
    gs = torch.autograd.grad(total, params, allow_unused=True)
    grads = {n: torch.zeros_like(p) if g is None else g
             for n, p, g in zip(names, params, gs, strict=True)}
    return grads, stats
