"""The live guard: fatal conditions in one freshly logged row, so a segment can stop early."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from models.health.dynamics import loss_limit_for
from models.health.finding import Finding, Severity

LOSS_KEYS = ("loss", "val_loss")


def fatal_findings(row: Mapping[str, float], *, vocab_size: int | None = None,
                   loss_limit: float | None = None) -> list[Finding]:
    """NaN/inf in any numeric value; ``residual`` == 0 with a loss above ``loss_limit``
    (default 1.5 ln V when ``vocab_size`` is given, else 20): a frozen explosion."""
    limit = loss_limit if loss_limit is not None else loss_limit_for(vocab_size)
    step = row.get("step", "?")
    out = []
    bad = [k for k, v in row.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)]
    if bad:
        out.append(Finding(
            detector="non_finite", severity=Severity.FATAL,
            message=f"{bad[0]} = {row[bad[0]]} at step {step}"
                    + (f" (also {', '.join(bad[1:5])})" if len(bad) > 1 else ""),
            where=f"logged row at step {step}; the last finite checkpoint",
            evidence={"columns": float(len(bad))}))
    res = row.get("residual")
    loss = max((float(row[k]) for k in LOSS_KEYS if k in row and math.isfinite(row[k])),
               default=None)
    if res is not None and res == 0 and loss is not None and loss > limit:
        out.append(Finding(
            detector="frozen_explosion", severity=Severity.FATAL,
            message=(f"residual == 0 with loss {loss:.4g} > {limit:.3g} at step {step}: an "
                     "explosion disguised as convergence (eps*F below ulp(z))"),
            where=f"logged row at step {step}; |z| and the jacreg floor",
            evidence={"loss": loss}))
    return out


def live_guard(vocab_size: int | None = None,
               loss_limit: float | None = None) -> Callable[[dict[str, float]], str | None]:
    """Adapter for ``training.segments.run_segment(guard=...)``: the first fatal message or None."""
    def guard(row: dict[str, float]) -> str | None:
        found = fatal_findings(row, vocab_size=vocab_size, loss_limit=loss_limit)
        return "; ".join(f.message for f in found) or None
    return guard
