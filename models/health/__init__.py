"""Health checks: detectors for the failure modes of METHODS §5, run on what training records.

``run_all(trace, extras)`` runs every detector whose inputs are present. ``trace`` is the scalar
log (one row per logged step, CONVENTIONS prefixes); ``extras`` holds diagnostics outputs:

- ``coverage_slots``: {name: per-slot mask} -> low_coverage names the dark slots
- ``residual_curve``: residual per relaxation step of one free phase -> limit_cycle
- ``self_coherence`` (+ ``self_coherence_reference``): EP batch self-cosines -> ep_self_coherence
  (else a ``self_coherence`` trace column)
- ``vocab_size`` or ``loss_limit``: the loss bound for frozen_explosion (1.5 ln V)
- ``no_grad_path``: term names flagged by recorders.term_grad_norm -> no_gradient_path
- ``outputs`` (strings or array) and ``soft_tokens`` (array [N, ...]) -> output_collapse
- ``rms``: {connection: (rms_fed, rms_expected)} -> magnitude_mismatch
- ``config_train`` / ``config_eval``: resolved config dicts incl. prompts -> config_drift
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from models.health._trace import series
from models.health.config import config_drift
from models.health.dynamics import (
    ep_self_coherence,
    frozen_explosion,
    limit_cycle,
    loss_limit_for,
    residual_growth,
)
from models.health.finding import Finding, Severity, worst_first
from models.health.guard import fatal_findings, live_guard
from models.health.losses import (
    constant_loss_term,
    dead_loss_term,
    flat_metric,
    no_gradient_path,
    non_finite,
)
from models.health.outputs import magnitude_mismatch, output_collapse
from models.health.precision import precision_collapse, precision_instability
from models.health.signals import low_coverage, vanishing_through_depth

__all__ = ["Finding", "Severity", "fatal_findings", "live_guard", "run_all"]


def run_all(trace: pd.DataFrame, extras: Mapping[str, Any] | None = None, *,
            run: str = "") -> list[Finding]:
    """Every applicable detector with default thresholds; findings worst first, tagged ``run``."""
    ex = dict(extras or {})
    limit = ex.get("loss_limit") or loss_limit_for(ex.get("vocab_size"))
    found = [
        *non_finite(trace),
        *frozen_explosion(trace, loss_limit=limit),
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
    if "config_train" in ex and "config_eval" in ex:
        found += config_drift(ex["config_train"], ex["config_eval"])
    return worst_first([f.with_run(run) for f in found])
