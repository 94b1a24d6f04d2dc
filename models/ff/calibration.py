"""Pre-run calibrations for the feed-forward rules: plain functions returning dicts.

- ``calibrate_dtp``: pre-train the DTP inverses on data (difference reconstruction) and report
  the ratio of top- to bottom-layer target-difference norm (1 = no vanishing or exploding targets
  through depth; log 000 saw 0.8^5 = 0.33 of the signal survive).
- ``calibrate_pc``: the largest settling step (from a grid) whose settling reaches the
  equilibrium tolerance within the iteration cap; sets it on the rule.
- ``dfa_feedback_scale``: the feedback scale that makes RMS(B_l e) equal the RMS of BP's
  dL/dh_l (averaged over layers); sets it on the rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from models.ff.mlp import true_state_grads
from models.ff.rules.dfa import DFA
from models.ff.rules.dtp import DTP
from models.ff.rules.pc import PC


def target_norm_ratio(rule: DTP, x: Tensor, y: Tensor) -> float:
    """||tau_L - h_L|| / ||tau_0 - h_0|| (batch means of per-sample norms)."""
    with torch.no_grad():
        hs = rule.net.states(x)
        taus = rule.targets(hs, y)
        top = (taus[-1] - hs[-1]).norm(dim=-1).mean()
        bottom = (taus[0] - hs[0]).norm(dim=-1).mean()
    return float(top / (bottom + 1e-12))


def calibrate_dtp(rule: DTP, x: Tensor, y: Tensor, steps: int = 200,
                  batch_size: int = 128) -> dict[str, float]:
    """Pre-train the inverses for ``steps`` minibatches of x (rule RNG picks the batches)."""
    ratio0 = target_norm_ratio(rule, x[:batch_size], y[:batch_size])
    rec0 = rec = float("nan")
    for i in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=rule.gen)
        with torch.no_grad():
            hs = rule.net.states(x[idx.to(x.device)])
        rec = rule.train_inverses(hs)
        if i == 0:
            rec0 = rec
    return {"inverse_rec_start": rec0, "inverse_rec_end": rec,
            "target_ratio_start": ratio0,
            "target_ratio": target_norm_ratio(rule, x[:batch_size], y[:batch_size])}


def calibrate_pc(rule: PC, x: Tensor, y: Tensor,
                 step_sizes: Sequence[float] = (0.4, 0.2, 0.1, 0.05)) -> dict[str, float]:
    """Largest settling step whose settling reaches the rule's tolerance within its iteration
    cap at initialisation; sets settle_lr. Raises if none does (energy or tolerance wrong)."""
    old = rule.cfg
    for lr in sorted(step_sizes, reverse=True):
        rule.cfg = old.model_copy(update={"settle_lr": lr})
        _, iters, res = rule.settle(x, y)
        if res <= rule.cfg.settle_tol:
            return {"settle_lr": lr, "settle_iters": float(iters), "residual": res}
    rule.cfg = old
    raise RuntimeError(f"PC settling reached tol={rule.cfg.settle_tol} within "
                       f"{rule.cfg.settle_iters} iterations for none of the step sizes "
                       f"{list(step_sizes)}")


def dfa_feedback_scale(rule: DFA, x: Tensor, y: Tensor) -> dict[str, float]:
    """Set the feedback scale so DFA credits have BP's RMS; returns the scale and the ratios."""
    _, g = true_state_grads(rule.net, x, y)
    with torch.no_grad():
        hs = rule.net.states(x)
    rule.scale.fill_(1.0)
    cs = rule.credits_from(hs, y)
    ratios = [float(t.pow(2).mean().sqrt() / (c.pow(2).mean().sqrt() + 1e-12))
              for c, t in zip(cs, g, strict=True)]
    scale = sum(ratios) / len(ratios)
    rule.scale.fill_(scale)
    return {"feedback_scale": scale, "ratio_min": min(ratios), "ratio_max": max(ratios)}
