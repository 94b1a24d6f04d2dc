"""Detectors on loss and metric traces: NaN/inf, flat lines, loss terms that are constant, dead
(≈0 from a scale mismatch) or have no gradient path."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from models.health._trace import named, series
from models.health.finding import Finding, Severity

# Convention keys logged on every row: a NaN there is a real NaN, not a row that did not log it.
EVERY_ROW_KEYS = ("loss", "lambda", "residual")
EVERY_ROW_PREFIXES = ("term/", "termgrad/", "act/", "grad/", "update/", "target/", "coverage/",
                      "precision/")


def _every_row(column: object) -> bool:
    return isinstance(column, str) and (column in EVERY_ROW_KEYS
                                        or column.startswith(EVERY_ROW_PREFIXES))


def non_finite(trace: pd.DataFrame) -> list[Finding]:
    """inf anywhere, or NaN in a per-step convention column after its first logged value."""
    steps = trace["step"].to_numpy() if "step" in trace.columns else np.arange(len(trace))
    bad: list[tuple[int, str, float]] = []
    for col in trace.columns:
        if col == "step":
            continue
        x = pd.to_numeric(trace[col], errors="coerce").to_numpy(dtype=float)
        finite = np.isfinite(x)
        mask = np.isinf(x)
        if _every_row(col) and finite.any():
            mask |= np.isnan(x) & (np.arange(x.size) > np.argmax(finite))
        if mask.any():
            i = int(np.argmax(mask))
            bad.append((i, str(col), float(x[i])))
    if not bad:
        return []
    bad.sort()
    i, col, value = bad[0]
    others = ", ".join(c for _, c, _ in bad[1:6])
    return [Finding(
        detector="non_finite", severity=Severity.FATAL,
        message=(f"{col} = {value} at step {steps[i]} (first of {len(bad)} non-finite columns"
                 + (f"; also {others}" if others else "") + ")"),
        where=f"trace column {col} from step {steps[i]}; the last finite checkpoint",
        evidence={"step": float(steps[i]), "columns": float(len(bad))})]


def flat_metric(trace: pd.DataFrame, columns: Sequence[str] | None = None, *,
                window_fraction: float = 0.5, rel_tol: float = 1e-6,
                min_rows: int = 5) -> list[Finding]:
    """A metric that is perfectly horizontal over the last ``window_fraction`` of the trace, or
    update norms (``update/*``) that are all exactly zero there: nothing is learning.

    Defaults: ``columns`` = ``loss`` plus ``val_*``/``metric/*``; ``rel_tol=1e-6`` is below any
    real learning or batch noise but above float round-off of a frozen model's eval.
    """
    if columns is None:
        columns = [c for c in trace.columns if isinstance(c, str)
                   and (c == "loss" or c.startswith(("val_", "metric/")))]
    out = []
    for col in columns:
        if col not in trace.columns:
            continue
        x = series(trace, col).to_numpy()
        if x.size < min_rows:
            continue
        w = x[-max(min_rows, int(x.size * window_fraction)):]
        spread = float(np.max(w) - np.min(w))
        level = float(np.median(np.abs(w)))
        if spread <= rel_tol * max(level, 1e-12):
            out.append(Finding(
                detector="flat_metric", severity=Severity.ERROR,
                message=(f"{col} is flat at {level:.6g} over the last {w.size} logged steps "
                         f"(spread {spread:.3g}): nothing is learning"),
                where=f"trace column {col}; whether the optimiser holds the model's parameters "
                      "and any update reaches them",
                evidence={"level": level, "spread": spread, "rows": float(w.size)}))
    updates = named(trace, "update/")
    if updates:
        tails = [s.to_numpy()[-max(1, int(len(s) * window_fraction)):] for s in updates.values()]
        if len(tails[0]) >= min_rows and all(np.all(t == 0) for t in tails):
            out.append(Finding(
                detector="flat_metric", severity=Severity.ERROR,
                message=f"all {len(updates)} update/* norms are exactly 0 over the last "
                        f"{len(tails[0])} logged steps: no parameter moves",
                where="update/* columns; the optimiser's parameter list, lr, gradient routing",
                evidence={"params": float(len(updates))}))
    return out


def dead_loss_term(trace: pd.DataFrame, *, rel_floor: float = 1e-4) -> list[Finding]:
    """A ``term/<name>`` that sits ≈0 from the start relative to the total ``loss`` (or the other
    terms): a scale mismatch (log 004: anchor MSE ~7e-7 between 10x-apart tensors).

    Uses the first half of the trace, so a term that is driven to 0 by learning does not fire.
    Default ``rel_floor=1e-4``: such a term moves parameters 1e4 times slower than the rest and
    prints as 0.0000. ``termgrad/<name>`` versus the other terms' is reported when logged.
    """
    terms = named(trace, "term/")
    if not terms:
        return []
    first = {n: float(np.median(np.abs(s.to_numpy()[: max(1, len(s) // 2)])))
             for n, s in terms.items()}
    grads = {n: float(np.median(np.abs(s.to_numpy())))
             for n, s in named(trace, "termgrad/").items()}
    if "loss" in trace.columns and len(series(trace, "loss")):
        loss = series(trace, "loss").to_numpy()
        ref_all = float(np.median(np.abs(loss[: max(1, loss.size // 2)])))
    else:
        ref_all = None
    out = []
    for name, level in first.items():
        ref = ref_all if ref_all is not None else sum(v for k, v in first.items() if k != name)
        if not ref or level >= rel_floor * ref:
            continue
        ev = {"level": level, "reference": ref, "ratio": level / ref}
        gtext = ""
        other = [v for k, v in grads.items() if k != name]
        if name in grads and other and max(other) > 0:
            ev["grad_ratio"] = grads[name] / max(other)
            gtext = f"; its gradient norm is {ev['grad_ratio']:.2e} of the largest other term's"
        out.append(Finding(
            detector="dead_loss_term", severity=Severity.WARNING,
            message=(f"term/{name} is ≈0 from the start: median {level:.3g} vs total "
                     f"{ref:.3g} (ratio {level / ref:.2e}){gtext}; likely a scale mismatch "
                     "between the tensors it compares"),
            where=f"term/{name}: the scales of its two operands (use a scale-free form, "
                  "e.g. cosine, or rescale)",
            evidence=ev))
    return out


def constant_loss_term(trace: pd.DataFrame, *, rel_tol: float = 1e-6,
                       min_rows: int = 5) -> list[Finding]:
    """A ``term/<name>`` with the same value on every logged step (log 004: VQ loss constant at
    1.249). Default ``rel_tol=1e-6``: any term fed by changing batches varies far more."""
    out = []
    for name, s in named(trace, "term/").items():
        x = s.to_numpy()
        if x.size < min_rows:
            continue
        level = float(np.median(np.abs(x)))
        spread = float(np.max(x) - np.min(x))
        if level > 0 and spread <= rel_tol * level:
            out.append(Finding(
                detector="constant_loss_term", severity=Severity.WARNING,
                message=(f"term/{name} is constant at {level:.6g} over {x.size} logged steps "
                         f"(spread {spread:.3g}): detached inputs, saturated, or no gradient path"),
                where=f"term/{name} and termgrad/{name}",
                evidence={"level": level, "spread": spread}))
    return out


def no_gradient_path(trace: pd.DataFrame, flagged: Iterable[str] = ()) -> list[Finding]:
    """A loss term whose gradient w.r.t. the trainable parameters is exactly 0 on every logged
    step (``termgrad/<name>``), or that ``recorders.term_grad_norm`` flagged as having no graph
    (e.g. ``torch.tensor(python_float)``; log 004's diversity loss)."""
    names: dict[str, str] = {}
    for name, s in named(trace, "termgrad/").items():
        if np.all(s.to_numpy() == 0):
            names[name] = f"termgrad/{name} == 0 on all {len(s)} logged steps"
    for name in flagged:
        names.setdefault(name, "recorder flagged no_grad_path")
    return [Finding(
        detector="no_gradient_path", severity=Severity.ERROR,
        message=(f"loss term {name} has no gradient path to the trainable parameters ({why}): "
                 "it is logged but trains nothing"),
        where=f"term/{name}: where it is built (a Python float re-wrapped in torch.tensor, "
              ".item(), .detach(), or a non-differentiable op)",
        evidence={}) for name, why in names.items()]
