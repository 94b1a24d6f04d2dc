"""``run_all``: every detector of ``models.health`` whose inputs are present, on one run (the
package docstring lists the ``extras`` keys); ``calibration_extras`` reads calibration.json."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from models.health._trace import series
from models.health.config import config_drift
from models.health.dynamics import (
    ep_self_coherence,
    frozen_explosion,
    gated_steps,
    limit_cycle,
    loss_limit_for,
    residual_growth,
    settling_at_cap,
    unstable_equilibrium,
)
from models.health.estimators import estimator_accuracy, estimator_sign, group_self_coherence
from models.health.finding import Finding, worst_first
from models.health.losses import (
    constant_loss_term,
    dead_loss_term,
    flat_metric,
    no_gradient_path,
    non_finite,
)
from models.health.norms import norm_excursions, runaway_norms
from models.health.outputs import (
    codebook_collapse,
    empty_generations,
    magnitude_mismatch,
    output_collapse,
    posterior_collapse,
    tanh_saturation,
)
from models.health.precision import precision_collapse, precision_instability
from models.health.progress import divergence, learns_nothing, worse_than_chance
from models.health.signals import low_coverage, vanishing_through_depth


def calibration_extras(calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """``chance``, ``chance_what``, ``untrained_loss`` and ``baselines`` from a calibration.json;
    older calibrations without a ``health`` block still give chance = ln V from ``ln_vocab``."""
    cal = dict(calibration or {})
    out: dict[str, Any] = dict(cal.get("health") or {})
    if "chance" not in out and cal.get("ln_vocab"):
        out["chance"] = float(cal["ln_vocab"])
        out.setdefault("chance_what", f"ln V = {out['chance']:.3f}, a uniform next-token guess")
    return out


def run_all(trace: pd.DataFrame, extras: Mapping[str, Any] | None = None, *,
            run: str = "") -> list[Finding]:
    """Every applicable detector with default thresholds; findings worst first, tagged ``run``."""
    ex = dict(extras or {})
    chance = ex.get("chance")
    limit = ex.get("loss_limit") or (1.5 * chance if chance else
                                     loss_limit_for(ex.get("vocab_size")))
    metrics = ex.get("metrics") or {}
    found = [
        *non_finite(trace),
        *frozen_explosion(trace, loss_limit=limit),
        *(worse_than_chance(trace, chance, what=ex.get("chance_what", ""),
                            untrained=ex.get("untrained_loss")) if chance else []),
        *divergence(trace),
        *runaway_norms(trace),
        *norm_excursions(trace),
        *estimator_sign(trace, metrics, warmup_steps=int(ex.get("warmup_steps", 0))),
        *estimator_accuracy(trace, warmup_steps=int(ex.get("warmup_steps", 0))),
        *unstable_equilibrium(trace, metrics, warmup_steps=int(ex.get("warmup_steps", 0))),
        *group_self_coherence(ex.get("self_coherence_groups") or {},
                              ex.get("self_coherence_groups_ref"), metrics),
        *learns_nothing(metrics, ex.get("baselines") or ()),
        *settling_at_cap(trace),
        *gated_steps(trace),
        *vanishing_through_depth(trace, "target/"),
        *low_coverage(trace, ex.get("coverage_slots")),
        *precision_instability(trace),
        *precision_collapse(trace),
        *residual_growth(trace),
        *flat_metric(trace),
        *no_gradient_path(trace, ex.get("no_grad_path", ())),
        *dead_loss_term(trace),
        *constant_loss_term(trace),
    ]
    if "residual_curve" in ex:
        found += limit_cycle(ex["residual_curve"])
    coherence = ex.get("self_coherence")
    if coherence is None and "self_coherence" in trace.columns:
        coherence = series(trace, "self_coherence").to_list()
    if coherence is not None:
        found += ep_self_coherence(coherence, ex.get("self_coherence_reference"))
    for key in ("outputs", "soft_tokens"):
        if key in ex:
            found += output_collapse(ex[key], name=key)
    if "rms" in ex:
        found += magnitude_mismatch(ex["rms"])
    if "posterior" in ex:  # {"lm_matched": float, "lm_shuffled": float}
        found += posterior_collapse(**ex["posterior"])
    if "pre_tanh" in ex:
        found += tanh_saturation(ex["pre_tanh"])
    if "codes" in ex:  # {"codes": [...], "codebook_size": int}
        found += codebook_collapse(**ex["codes"])
    if "generations" in ex:
        found += empty_generations(ex["generations"])
    if "config_train" in ex and "config_eval" in ex:
        found += config_drift(ex["config_train"], ex["config_eval"])
    if "prompts" in ex:  # {"train": str, "eval": str}: what a generator is prompted with
        found += config_drift({"prompt": ex["prompts"]["train"]}, {"prompt": ex["prompts"]["eval"]})
    return worst_first([f.with_run(run) for f in found])
