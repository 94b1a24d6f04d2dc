"""The live guard: fatal findings while a segment trains, so it can stop early.

``fatal_findings`` checks one freshly logged row (NaN/inf, a frozen explosion); ``live_guard``
keeps every row logged so far (and the run's earlier segments, passed as ``history``) and runs
all trace detectors on them, so each fatal condition ``diagnose`` would report (worse than
chance far beyond, runaway norms by 1000x, ...) stops the segment too. It reads plain floats,
so it behaves the same on CPU and CUDA; the segment driver raises before writing the
checkpoint, so the last good checkpoint is the previous segment's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from models.health.dynamics import FLOAT32_EPS, loss_limit_for
from models.health.finding import Finding, Severity
from models.health.run import run_all

LOSS_KEYS = ("loss", "val_loss")


def fatal_findings(row: Mapping[str, float], *, vocab_size: int | None = None,
                   loss_limit: float | None = None,
                   resolution: float = 10 * FLOAT32_EPS) -> list[Finding]:
    """NaN/inf in any numeric value; a ``residual`` at the float resolution of the state with a
    loss above ``loss_limit`` (default 1.5 ln V when ``vocab_size`` is given, else 20): a frozen
    explosion (see ``dynamics.frozen_explosion``)."""
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
    if res is not None and abs(res) <= resolution and loss is not None and loss > limit:
        out.append(Finding(
            detector="frozen_explosion", severity=Severity.FATAL,
            message=(f"residual {res:.3g} <= {resolution:.2g} with loss {loss:.4g} > "
                     f"{limit:.3g} at step {step}: an explosion disguised as convergence "
                     "(eps*F below ulp(z))"),
            where=f"logged row at step {step}; |z| and the jacreg floor",
            evidence={"loss": loss, "residual": float(res)}))
    return out


def live_guard(vocab_size: int | None = None, loss_limit: float | None = None, *,
               extras: Mapping[str, Any] | None = None,
               history: Iterable[Mapping[str, float]] = (),
               ) -> Callable[[dict[str, float]], str | None]:
    """Adapter for ``training.segments.run_segment(guard=...)``: the fatal findings of the run so
    far as one message, or None. ``extras`` are ``run_all``'s (e.g. ``calibration_extras``:
    chance, untrained loss); ``history`` the rows of the run's earlier segments."""
    ex = dict(extras or {})
    if loss_limit is not None:
        ex["loss_limit"] = loss_limit
    if vocab_size is not None:
        ex.setdefault("vocab_size", vocab_size)
    limit = ex.get("loss_limit") or (1.5 * ex["chance"] if ex.get("chance") else None)
    rows = [dict(r) for r in history]

    def guard(row: dict[str, float]) -> str | None:
        rows.append(dict(row))
        found = fatal_findings(row, vocab_size=vocab_size, loss_limit=limit)
        found += [f for f in run_all(pd.DataFrame.from_records(rows), ex)
                  if f.severity >= Severity.FATAL
                  and f.detector not in {g.detector for g in found}]
        return "; ".join(f"{f.detector}: {f.message}" for f in found) or None
    return guard
