"""One training step of an equilibrium rule: the rule's task gradient, the stabilisers, the
validity gate and the jacreg controller, in that order (METHODS §2, "Equilibrium").

Apart from ``models.eqt.model`` so that the model knows no rule and the rule modules (``bptt``,
``ep``, ``implicit``) can name the model without an import cycle.
"""

from __future__ import annotations

import torch

from models.config.eqt import BPTTRule, EPRule, StabiliserConfig
from models.eqt import bptt, ep, implicit, stabilisers
from models.eqt.model import EquilibriumLM

RuleConfig = BPTTRule | EPRule | implicit.ImplicitConfig


def gradients(model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor,
              rule_cfg: RuleConfig,
              controller: stabilisers.JacregController | None = None,
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Parameter gradients of one training step for ``rule_cfg`` (BPTT, implicit or EP).

    Task gradient from the rule, plus the stabilisers of ``rule_cfg.stab``: jacreg with the
    controller's lambda (the controller is then updated with this step's residual), resreg, and
    the validity gate (res > gate: no task gradient, stabilisers only). The caller sets
    ``p.grad = grads[name]`` and steps its optimizer.
    """
    stab = rule_cfg.stab
    if isinstance(rule_cfg, BPTTRule):
        task, stats, free = bptt.bptt_gradients(model, idx, targets)
    else:
        free = model.free_phase(idx)
        shut = gate_shut(stab, free.residual)
        if shut:
            task = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
            stats = {"residual": free.residual, "settle_iters": float(free.steps)}
        elif isinstance(rule_cfg, EPRule):
            task, stats = ep.ep_gradients(model, idx, targets, rule_cfg.nudge, free)
            if adjoint_gate_shut(stab, stats):
                task = {n: torch.zeros_like(g) for n, g in task.items()}
        else:
            task, stats = implicit.implicit_gradients(model, idx, targets, rule_cfg, free)
        stats["gate_skipped"] = float(shut)
    extra, extra_stats = stabilisers.stabiliser_gradients(model, idx, free, stab,
                                                          jacreg_weight(stab, controller))
    stats.update(extra_stats)
    return finish(task, extra, stats, stab, controller, free.residual, free.residual_t1)


def gate_shut(stab: StabiliserConfig, residual: float) -> bool:
    """The validity gate: above ``stab.gate`` (or non-finite) the free phase is no equilibrium,
    and the step keeps the stabilisers only."""
    return stab.gate is not None and not residual <= stab.gate


def adjoint_gate_shut(stab: StabiliserConfig, stats: dict[str, float]) -> bool:
    """The nudged phase's validity gate (``stab.adjoint_gate``): its estimated remaining change
    of a (``settle/nudged/residual``, logged with ``t2_tol``) above the gate, or non-finite,
    means the contrast had not settled. Sets ``stats["gate_adjoint"]``."""
    remaining = stats.get("settle/nudged/residual")
    shut = (stab.adjoint_gate is not None and remaining is not None
            and not remaining <= stab.adjoint_gate)
    if stab.adjoint_gate is not None:
        stats["gate_adjoint"] = float(shut)
    return shut


def jacreg_weight(stab: StabiliserConfig, controller: stabilisers.JacregController | None) -> float:
    """lambda of this step: the controller's, else the fixed ``stab.jacreg``."""
    return controller.lam if controller is not None else stab.jacreg


def finish(task: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], stats: dict[str, float],
           stab: StabiliserConfig, controller: stabilisers.JacregController | None,
           residual: float, residual_t1: float,
           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The end of every step, eager or fast: task + stabiliser gradients, the controller's
    update with this step's residual (after T1 steps or at the end, ``stab.control``; and the
    nudged tail where the controller follows the adjoint), the global gradient norm."""
    if controller is not None:
        controller.update(residual_t1 if stab.control == "t1" else residual,
                          stats.get("a_tail_head"))
    stats["residual_t1"] = residual_t1
    grads = {n: task[n] + extra[n] if n in extra else task[n] for n in task}
    stats["grad/global"] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
    return grads, stats
