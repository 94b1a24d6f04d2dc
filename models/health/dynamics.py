"""Detectors on fixed-point dynamics: residual growth, limit cycles, explosions that look converged,
and an EP estimator that stops agreeing with itself across batches."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from models.health._trace import series
from models.health.finding import Finding, Severity

# 1.5 ln V exceeds a uniform guess for any V; without V, 20 = 1.5 ln(6e5) covers every tokenizer.
DEFAULT_LOSS_LIMIT = 20.0


def loss_limit_for(vocab_size: int | None) -> float:
    """Loss above which a run is worse than uniform guessing by a clear margin: 1.5 ln V."""
    return 1.5 * math.log(vocab_size) if vocab_size else DEFAULT_LOSS_LIMIT


def residual_growth(trace: pd.DataFrame, *, max_residual: float = 1e-2, growth: float = 10.0,
                    floor: float = 1e-4) -> list[Finding]:
    """Free-phase relative residual (``residual``) that grows over training: loss of contraction.

    Defaults: ``max_residual=1e-2``: log 003 gates updates at 5e-3 and broken (Hopf) runs sit at
    0.07-0.1; ``growth=10``: a 10x rise from the best early value is drift toward the boundary;
    ``floor=1e-4`` (the res target): growth below it is harmless.
    """
    if "residual" not in trace.columns:
        return []
    r = series(trace, "residual").to_numpy()
    if r.size < 4:
        return []
    early, late = r[: r.size // 2], r[-max(2, r.size // 4):]
    best, now = float(np.min(early)), float(np.median(late))
    ratio = now / best if best > 0 else math.inf
    if now > max_residual:
        severity = Severity.ERROR
    elif now > floor and ratio > growth:
        severity = Severity.WARNING
    else:
        return []
    return [Finding(
        detector="residual_growth", severity=severity,
        message=(f"free-phase residual grew from best {best:.3g} early to {now:.3g} late "
                 f"({ratio:.3g}x; gate-level is {max_residual:g}): the fixed point is losing "
                 "contraction"),
        where="trace column residual; the block's Jacobian (abscissa), jacreg/resreg strength",
        evidence={"best_early": best, "late": now, "ratio": ratio})]


def limit_cycle(curve: Sequence[float], *, tol: float = 1e-4, tail_fraction: float = 0.25,
                min_decay: float = 0.9) -> list[Finding]:
    """One relaxation's residual per iteration that stops decreasing above ``tol``.

    Defaults: ``tol=1e-4`` is the res target; ``min_decay=0.9``: on a limit cycle (Hopf) the
    residual over the last quarter of the steps stays flat or oscillates (ratio ~1), while a slowly
    contracting map still shrinks it by >10% (that is a warning: converging, just not in budget).
    """
    r = np.asarray(curve, dtype=float)
    if r.size < 8 or not np.all(np.isfinite(r)):
        return []
    tail = r[-max(2, int(r.size * tail_fraction)):]
    final, decay = float(r[-1]), float(tail[-1] / tail[0]) if tail[0] > 0 else 0.0
    if final <= tol:
        return []
    stuck = decay > min_decay
    return [Finding(
        detector="limit_cycle",
        severity=Severity.ERROR if stuck else Severity.WARNING,
        message=(f"relaxation residual ends at {final:.3g} > {tol:g} after {r.size} steps and "
                 + (f"does not decay over the last {tail.size} (x{decay:.3g}): limit cycle / "
                    "loss of contraction, more steps will not help" if stuck else
                    f"is still decaying slowly (x{decay:.3g} over the last {tail.size})")),
        where="extras['residual_curve']; the block's spectral scale / damping c / jacreg",
        evidence={"final": final, "tail_decay": decay, "steps": float(r.size)})]


def frozen_explosion(trace: pd.DataFrame, *, loss_limit: float = DEFAULT_LOSS_LIMIT,
                     zero_residual: float = 0.0) -> list[Finding]:
    """``residual`` exactly 0 together with ``loss`` above ``loss_limit``: eps F < ulp(z) froze an
    exploded state (log 003), which looks converged but is not."""
    if "residual" not in trace.columns or "loss" not in trace.columns:
        return []
    res = pd.to_numeric(trace["residual"], errors="coerce").to_numpy(dtype=float)
    loss = pd.to_numeric(trace["loss"], errors="coerce").to_numpy(dtype=float)
    hit = np.flatnonzero((np.abs(res) <= zero_residual) & (loss > loss_limit))
    if hit.size == 0:
        return []
    steps = trace["step"].to_numpy() if "step" in trace.columns else np.arange(len(trace))
    first = int(hit[0])
    return [Finding(
        detector="frozen_explosion", severity=Severity.FATAL,
        message=(f"residual == {res[first]:g} with loss {loss[first]:.4g} > {loss_limit:.3g} "
                 f"from step {steps[first]} ({hit.size} rows): an explosion disguised as "
                 "convergence (eps*F below ulp(z))"),
        where="trace columns residual, loss; the state norm |z| and the jacreg floor",
        evidence={"loss": float(loss[first]), "step": float(steps[first]),
                  "rows": float(hit.size)})]


def ep_self_coherence(values: Sequence[float], reference: Sequence[float] | None = None, *,
                      min_coherence: float = 0.0, last: int = 3) -> list[Finding]:
    """Batch-to-batch cosine of the EP gradient estimate turning negative (log 003: -0.27 while
    BPTT stayed +0.96). Default ``min_coherence=0``: below 0 estimates on different batches
    cancel, i.e. the update is noise; ``reference`` (e.g. BPTT's) says whether the true gradient
    is still coherent, which makes it an estimator failure rather than a converged run."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return []
    now = float(np.median(v[-last:]))
    if now >= min_coherence:
        return []
    ev = {"self_coherence": now}
    ref_text = ""
    severity = Severity.ERROR
    if reference is not None and len(reference):
        ref = float(np.median(np.asarray(reference, dtype=float)[-last:]))
        ev["reference"] = ref
        ref_text = f" while the reference gradient's is {ref:+.3f}"
        if ref < min_coherence:
            severity = Severity.INFO  # the true gradient is incoherent too: near an optimum
    return [Finding(
        detector="ep_self_coherence", severity=severity,
        message=(f"EP gradient batch self-coherence is {now:+.3f} (median of last "
                 f"{min(last, v.size)}){ref_text}: the estimator's batch noise dominates"),
        where="extras['self_coherence']; nudging beta, T2, free-phase residual at this checkpoint",
        evidence=ev)]
