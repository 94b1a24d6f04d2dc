"""Initial calibration of the free phase: is the fixed point reachable with this (eps, T1)?

Measures the free-phase residual on a few batches for the configured eps and, if asked, for
eps/2 and eps/4 (T1 and t1max scaled so eps * T1 stays fixed); picks the largest eps whose
relaxation reaches res <= res_target within t1max on every batch, records the initial numerical
abscissa, and raises a ValueError naming the knobs when none does. A residual of exactly 0 with
a non-finite or huge state is treated as an explosion (log 003: eps F < ulp(z) freezes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from models.eqt.diagnostics import numerical_abscissa
from models.eqt.relax import RelaxConfig, relax

if TYPE_CHECKING:
    from models.eqt.model import EquilibriumLM


def _measure(model: EquilibriumLM, batches: Sequence[torch.Tensor],
             cfg: RelaxConfig) -> dict[str, Any]:
    res_t1, res, steps = [], [], []
    with torch.no_grad():
        for idx in batches:
            x_in = model.x_in(idx)
            out = relax(lambda z, x=x_in: model.force(z, x), x_in, cfg)
            exploded = not torch.isfinite(out.z).all() or out.z.abs().max() > 1e6 * (
                x_in.abs().max() + 1)
            res_t1.append(math.inf if exploded else out.residual_t1)
            res.append(math.inf if exploded else out.residual)
            steps.append(out.steps)
    ok = all(r <= cfg.res_target for r in res)
    return {"relax": cfg.model_dump(), "ok": ok, "residual_t1": res_t1, "residual": res,
            "steps": steps}


def calibrate(model: EquilibriumLM, batches: Sequence[torch.Tensor],
              search: bool = True) -> dict[str, Any]:
    """Validate (or, with ``search``, choose) eps/T1 for ``model.relax_cfg`` on ``batches``.

    Returns {"relax": chosen config as a dict, "changed": bool, "trials": [...],
    "init_abscissa": float, "init_residual": max residual}. The caller builds the training
    model with the returned relax config; the model itself is not modified.
    """
    base = model.relax_cfg
    factors = (1, 2, 4) if search else (1,)
    trials = []
    for f in factors:
        cfg = base.model_copy(update={"eps": base.eps / f, "t1": base.t1 * f, "t1max": base.t1max * f})
        trial = _measure(model, batches, cfg)
        trials.append(trial)
        if trial["ok"]:
            return {"relax": trial["relax"], "changed": f != 1, "trials": trials,
                    "init_residual": max(trial["residual"]),
                    "init_abscissa": numerical_abscissa(model, batches[0])}
    worst = max(trials[0]["residual"])
    raise ValueError(
        f"calibration: the free phase does not converge at init: residual {worst:.3e} > "
        f"res_target {base.res_target:.1e} with eps={base.eps}, t1={base.t1}, "
        f"t1max={base.t1max}" + (" (eps/2 and eps/4 failed too)" if search else "")
        + f". Lower eps, raise t1/t1max, or raise the damping c (now {model.shape.damping}); "
        "an eps above 2/|lambda(J)| makes z <- z + eps F(z) diverge.")
