"""Detectors on fixed-point dynamics: residual growth, limit cycles, explosions that look converged,
and an EP estimator that stops agreeing with itself across batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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
    trend = (f"grew from best {best:.3g} early to {now:.3g} late ({ratio:.3g}x"
             if ratio > 1 else f"stays at {now:.3g} late (best early {best:.3g}")
    return [Finding(
        detector="residual_growth", severity=severity,
        message=(f"free-phase residual {trend}; gate-level is {max_residual:g}): the fixed point "
                 + ("is losing contraction" if ratio > 1 else "is not reached")),
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


# float32's machine epsilon: the state dtype of every trainer (bf16 runs would be coarser still).
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def frozen_explosion(trace: pd.DataFrame, *, loss_limit: float = DEFAULT_LOSS_LIMIT,
                     resolution: float = 10 * FLOAT32_EPS) -> list[Finding]:
    """A free-phase ``residual`` at or below the float resolution of the state together with a
    ``loss`` above ``loss_limit``: eps F < ulp(z) froze an exploded state (log 003), which reads
    as converged but is not (the issue's EP run: res 3e-8 with loss 38.5).

    ``resolution=10 * eps(float32)`` (1.2e-6): res = |eps F| / |z| is the relative step; at a
    few ulps per element rounding decides whether z moves at all, so such a residual says
    nothing about convergence; a healthy relaxation stops at its res_target (1e-4) or decays
    there with a loss near its best. The loss condition keeps genuinely tight fixed points of
    a good model silent. ``act/z_star`` growth is quoted when logged.
    """
    if "residual" not in trace.columns or "loss" not in trace.columns:
        return []
    res = pd.to_numeric(trace["residual"], errors="coerce").to_numpy(dtype=float)
    loss = pd.to_numeric(trace["loss"], errors="coerce").to_numpy(dtype=float)
    hit = np.flatnonzero((np.abs(res) <= resolution) & (loss > loss_limit))
    if hit.size == 0:
        return []
    steps = trace["step"].to_numpy() if "step" in trace.columns else np.arange(len(trace))
    first = int(hit[0])
    state = ""
    ev = {"loss": float(loss[first]), "residual": float(res[first]),
          "step": float(steps[first]), "rows": float(hit.size)}
    if "act/z_star" in trace.columns:
        z = pd.to_numeric(trace["act/z_star"], errors="coerce").to_numpy(dtype=float)
        ok = np.flatnonzero(np.isfinite(z))
        if ok.size:
            state = f"; |z*| RMS {z[ok[0]]:.3g} at step {steps[ok[0]]} -> {z[first]:.3g}"
            ev["z_star"] = float(z[first])
    return [Finding(
        detector="frozen_explosion", severity=Severity.FATAL,
        message=(f"residual {res[first]:.3g} <= {resolution:.2g} (float32 resolution of the "
                 f"state) with loss {loss[first]:.4g} > {loss_limit:.3g} from step "
                 f"{steps[first]} ({hit.size} rows){state}: an explosion disguised as "
                 "convergence (eps*F below ulp(z))"),
        where="trace columns residual, loss, act/z_star; the state norm |z*| and the jacreg floor",
        evidence=ev)]


def settling_at_cap(trace: pd.DataFrame, *, default_tol: float = 1e-3,
                    min_rows: int = 2) -> list[Finding]:
    """Relaxation / settling loops that end at their iteration cap above their tolerance.

    A loop declares itself with ``settle/<loop>/tol`` (its tolerance; 0 = a fixed-step loop)
    and optionally ``settle/<loop>/cap``; its final relative residual is
    ``settle/<loop>/residual``, else the row's ``residual``, its iterations
    ``settle/<loop>/iters``, else ``settle_iters``. A loop stops as soon as the residual is at
    or below tol, so ending above it means it ran out of iterations. Warning when that happens
    on most (>50%) logged steps, error on all: the "equilibrium" the rule's gradient assumes was
    never reached (the issue's PC: cap on every step, residual 0.02-0.027 vs tol 3e-3).
    ``default_tol=1e-3`` judges fixed-step loops: the state still moves 0.1% per step there, i.e.
    tens of percent over another relaxation of the same length. ``min_rows=2``: each logged row
    samples one step's loop; the default rules_vision PC logs two rows, both at the cap.
    """
    out = []
    loops = sorted({c.split("/")[1] for c in trace.columns
                    if isinstance(c, str) and c.startswith("settle/") and c.endswith("/tol")})
    for loop in loops:
        res_col = f"settle/{loop}/residual"
        res_col = res_col if res_col in trace.columns else "residual"
        if res_col not in trace.columns:
            continue
        frame = pd.DataFrame({
            "res": pd.to_numeric(trace[res_col], errors="coerce"),
            "tol": pd.to_numeric(trace[f"settle/{loop}/tol"], errors="coerce")})
        frame.index = trace["step"].to_numpy() if "step" in trace.columns else trace.index
        frame = frame.dropna()
        if len(frame) < min_rows:
            continue
        tol = frame["tol"].where(frame["tol"] > 0, default_tol)
        capped = (frame["res"] > tol).to_numpy()
        share = float(capped.mean())
        if share <= 0.5:
            continue
        iters_col = next((c for c in (f"settle/{loop}/iters", "settle_iters")
                          if c in trace.columns), None)
        cap_col = f"settle/{loop}/cap"
        detail = ""
        if iters_col is not None and cap_col in trace.columns:
            it = pd.to_numeric(trace[iters_col], errors="coerce").median()
            cap = pd.to_numeric(trace[cap_col], errors="coerce").median()
            detail = f", median {it:.0f} iterations of a cap of {cap:.0f}"
        res = frame["res"].to_numpy()[capped]
        steps = frame.index.to_numpy()[capped]
        out.append(Finding(
            detector="settling_at_cap",
            severity=Severity.ERROR if capped.all() else Severity.WARNING,
            message=(f"{loop} loop ends at its iteration cap above tolerance "
                     f"{float(tol.median()):.2g} on {int(capped.sum())} of {capped.size} logged "
                     f"steps ({share:.0%}; steps {steps[0]}-{steps[-1]}), residual "
                     f"{float(res.min()):.3g}-{float(res.max()):.3g}{detail}"),
            where=f"settle/{loop}/* and {res_col}; the loop's step size and iteration cap "
                  "(calibration) or the energy it descends",
            evidence={"share": share, "residual_median": float(np.median(res)),
                      "tol": float(tol.median()), "rows": float(capped.size)}))
    return out


def unstable_equilibrium(trace: pd.DataFrame, metrics: Mapping[str, float] | None = None, *,
                         warmup_steps: int = 0) -> list[Finding]:
    """Warning: z* was not a stable fixed point of the relaxation at training's cosine
    checkpoints after warm-up (trace ``cos_ref_unstable`` = 1: the damped adjoint iteration, whose
    spectrum is the free phase's linearisation, grew; ``models.eqt.implicit``) or on held-out
    batches at the final weights (diagnose's ``unstable_batches`` of ``diagnose_batches``).

    The free-phase residual cannot show it: after T1 steps from x_in a growing mode may still be
    small (reports/gpu-short: a CPU case at the protocol's shape with residual 1e-5 after T1
    steps and a damped rate of 1.017). A longer relaxation would follow that mode away from z*, and
    EP and BPTT then estimate finite-time gradients, not the equilibrium's: there the reference
    is the T1 unroll, and the implicit gradient can be far from both (GPU protocol at ff7c04e: EP
    at cos 0.997 to BPTT on the final weights, 0.84 to the implicit gradient with one of the four
    held-out batches unstable).
    """
    parts, evidence = [], {}
    if "cos_ref_unstable" in trace.columns:
        flags = series(trace, "cos_ref_unstable")
        flags = flags[flags.index.to_numpy() > warmup_steps]
        steps = [int(s) for s in flags.index[flags.to_numpy() == 1]]
        if steps:
            res = series(trace, "residual") if "residual" in trace.columns else None
            at = [float(res[s]) for s in steps if res is not None and s in res.index]
            detail = f" (free-phase residual {min(at):.1e}-{max(at):.1e} there)" if at else ""
            parts.append(f"at {len(steps)} of the {flags.size} cosine checkpoints after the "
                         f"{warmup_steps}-step warm-up that solved or tried the adjoint (steps "
                         f"{', '.join(map(str, steps))}){detail}")
            evidence |= {"checkpoints_unstable": float(len(steps)),
                         "checkpoints": float(flags.size)}
    m = metrics or {}
    held_out = float(m.get("unstable_batches", 0.0) or 0.0)
    # diagnostics without diagnose_batches predate held_out_cosines: their cos to implicit
    # averaged the unstable batches in
    n = m.get("diagnose_batches")
    split = n is not None and math.isfinite(n)
    if held_out > 0:
        cos_imp = m.get("cos_implicit_unstable")
        parts.append(f"on {held_out:.0f}{f' of {n:.0f}' if split else ''} held-out "
                     f"batch{'es' if held_out > 1 or split else ''} at the final weights "
                     "(diagnose)"
                     + (f", where the rule's cosine to the implicit gradient is {cos_imp:.3f}"
                        if cos_imp is not None and math.isfinite(cos_imp) else ""))
        evidence |= {"batches_unstable": held_out}
    if not parts:
        return []
    averaged = ("" if held_out == 0 else "; cos to implicit averages the stable held-out batches "
                "only" if split else "; the cos to implicit of these diagnostics averages them in")
    return [Finding(
        detector="unstable_equilibrium", severity=Severity.WARNING,
        message=("z* was an unstable fixed point of the relaxation " + "; and ".join(parts)
                 + ": the damped adjoint iteration grew, so a small residual after T1 steps hid "
                 "a growing mode; the cosines there compare finite-time gradients (reference: "
                 "the T1 unroll)" + averaged),
        where="trace columns cos_ref_unstable, residual, lambda at those steps (the jacreg "
              "controller's reach: lam_max) and cos_implicit/*; diagnostics.json metrics "
              "unstable_batches, cos_implicit_unstable",
        evidence=evidence)]


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


GATES = {"gate_skipped": "the free phase's residual was above the validity gate",
         "gate_adjoint": "the nudged phase had not settled (the adjoint gate)"}


def gated_steps(trace: pd.DataFrame, *, warn_share: float = 0.1, error_share: float = 0.5,
                min_rows: int = 4) -> list[Finding]:
    """Steps whose task gradient a validity gate dropped (``gate_skipped``: the free phase;
    ``gate_adjoint``: the nudged phase, ``models.eqt.step``). A gated step applies only the
    stabilisers, so a run gated on a large share of its steps learned from few of them while
    its loss curve looks merely slow. Warning above ``warn_share`` of the logged rows (each
    samples one step), error above ``error_share``."""
    out = []
    for column, why in GATES.items():
        if column not in trace.columns:
            continue
        s = series(trace, column)
        if len(s) < min_rows:
            continue
        shut = s.to_numpy() > 0
        share = float(shut.mean())
        if share <= warn_share:
            continue
        steps = s.index.to_numpy()[shut]
        out.append(Finding(
            detector="gated_steps",
            severity=Severity.ERROR if share > error_share else Severity.WARNING,
            message=(f"{column}: {share:.0%} of {len(s)} logged steps had no task gradient "
                     f"({why}; first at step {int(steps[0])}, last at {int(steps[-1])})"),
            where=f"trace column {column}; the stabiliser (stab.gate / stab.adjoint_gate, the "
                  "jacreg controller's target) and the step size",
            evidence={"share": share, "rows": float(len(s))}))
    return out
