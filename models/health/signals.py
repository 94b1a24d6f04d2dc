"""Detectors on per-layer norm traces: signals that vanish through depth, slots that get nothing."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from models.health._trace import named, slots_text
from models.health.finding import Finding, Severity


def vanishing_through_depth(trace: pd.DataFrame, prefix: str = "target/", *,
                            min_ratio: float = 0.5, error_ratio: float = 0.1) -> list[Finding]:
    """Smallest over largest per-layer median norm of ``prefix<layer>`` columns.

    Defaults: ``min_ratio=0.5`` because norm-preserving (residual + normalised) inverses keep the
    ratio near 1 while log 000's 0.8-per-layer contraction over 5 layers leaves 0.33;
    ``error_ratio=0.1`` is where the bottom layers get effectively nothing.
    """
    layers = named(trace, prefix)
    if len(layers) < 2:
        return []
    names = list(layers)
    med = np.array([float(layers[n].abs().median()) for n in names])
    hi, lo = int(np.argmax(med)), int(np.argmin(med))
    if med[hi] <= 0:
        return []
    ratio = float(med[lo] / med[hi])
    if ratio >= min_ratio:
        return []
    hops = abs(hi - lo)
    per_layer = ratio ** (1.0 / hops) if ratio > 0 else 0.0
    kind = "targets" if prefix.startswith("target") else prefix.rstrip("/") + " signal"
    return [Finding(
        detector="vanishing_through_depth",
        severity=Severity.ERROR if ratio < error_ratio else Severity.WARNING,
        message=(f"{kind} vanish through depth: median norm {med[hi]:.3g} at {prefix}{names[hi]} "
                 f"-> {med[lo]:.3g} at {prefix}{names[lo]} (ratio {ratio:.3f}, "
                 f"{per_layer:.3f} per layer over {hops} layers)"),
        where=f"trace columns {prefix}{names[0]} .. {prefix}{names[-1]}; the inverse/feedback "
              f"maps between {names[hi]} and {names[lo]}",
        evidence={"ratio": ratio, "per_layer": per_layer, "layers": float(hops),
                  "top_norm": float(med[hi]), "bottom_norm": float(med[lo])})]


def low_coverage(trace: pd.DataFrame, slots: Mapping[str, np.ndarray] | None = None, *,
                 min_fraction: float = 0.9, error_fraction: float = 0.5) -> list[Finding]:
    """Fraction of state slots receiving a nonzero target/gradient (``coverage/<name>`` columns
    and/or per-slot masks in ``slots``, e.g. from ``recorders.slot_coverage``).

    Defaults: ``min_fraction=0.9`` since a few dead units are normal but a routing bug leaves
    most slots dark (log 000: 32 of 512 slots); ``error_fraction=0.5``: most of the state is idle.
    """
    slots = dict(slots or {})
    fractions = {n: float(s.median()) for n, s in named(trace, "coverage/").items()}
    masks = {n: np.asarray(m).reshape(-1) != 0 for n, m in slots.items()}
    for n, m in masks.items():
        fractions.setdefault(n, float(m.mean()) if m.size else 1.0)
    out = []
    for name, frac in fractions.items():
        if frac >= min_fraction:
            continue
        ev = {"fraction": frac}
        detail = ""
        if name in masks:
            m = masks[name]
            ev |= {"covered": float(m.sum()), "slots": float(m.size)}
            detail = (f"; only slots {slots_text(np.flatnonzero(m))} of {m.size} receive any; "
                      f"{int((~m).sum())} slots ({slots_text(np.flatnonzero(~m))}) get none")
        out.append(Finding(
            detector="low_coverage",
            severity=Severity.ERROR if frac < error_fraction else Severity.WARNING,
            message=f"coverage/{name}: median fraction of slots with a nonzero target/gradient "
                    f"is {frac:.3f}{detail}",
            where=f"coverage/{name}: the indexing/slicing that routes {name}'s targets/gradients",
            evidence=ev))
    return out
