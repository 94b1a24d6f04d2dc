"""Detectors on learned precisions (``precision/<layer>``): late oscillation/divergence,
collapse to zero."""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.health._trace import named
from models.health.finding import Finding, Severity


def precision_instability(trace: pd.DataFrame, *, late_fraction: float = 0.25,
                          max_growth: float = 10.0, amplitude_growth: float = 4.0,
                          min_amplitude: float = 0.05) -> list[Finding]:
    """Precision that oscillates with growing amplitude or runs away late in training.

    Compares the last ``late_fraction`` of the trace with its first half. Defaults:
    ``max_growth=10``: a precision 10x above its early median is spiking (log 000 at 15k steps);
    ``amplitude_growth=4``: step-to-step swings 4x larger than early ones are a resonance, not
    noise; ``min_amplitude=0.05``: swings under 5% of the level are harmless jitter.
    """
    out = []
    for layer, s in named(trace, "precision/").items():
        x = s.to_numpy()
        if x.size < 8:
            continue
        early, late = x[: x.size // 2], x[-max(3, int(round(x.size * late_fraction))):]
        base = float(np.median(np.abs(early)))
        if base <= 0:
            continue
        peak = float(np.max(np.abs(late)) / base)
        amp_early = float(np.std(np.diff(early)) / base)
        amp_late = float(np.std(np.diff(late)) / base)
        d = np.diff(late)
        flips = float(np.mean(np.sign(d[1:]) != np.sign(d[:-1]))) if d.size > 1 else 0.0
        growing = amp_late > min_amplitude and amp_late > amplitude_growth * max(amp_early, 1e-12)
        if peak <= max_growth and not growing:
            continue
        what = "diverges" if peak > max_growth else "oscillates with growing amplitude"
        out.append(Finding(
            detector="precision_instability",
            severity=Severity.ERROR,
            message=(f"precision/{layer} {what} late in training: late peak {peak:.3g}x the early "
                     f"median {base:.3g}, step-to-step swing {amp_late:.3g} vs {amp_early:.3g} "
                     f"early, direction flips on {flips:.0%} of late steps"),
            where=f"precision/{layer} and its neighbours' prediction errors; the precision "
                  "update (needs damping)",
            evidence={"peak_ratio": peak, "amp_late": amp_late, "amp_early": amp_early,
                      "flip_fraction": flips}))
    return out


def precision_collapse(trace: pd.DataFrame, *, min_ratio: float = 0.01) -> list[Finding]:
    """Precision driven toward zero, muting that layer's errors (log 001).

    Default ``min_ratio=0.01``: ending 100x below its first logged value means the layer's
    errors no longer drive anything; a floored precision stops well above this.
    """
    out = []
    for layer, s in named(trace, "precision/").items():
        x = s.to_numpy()
        if x.size < 3 or x[0] <= 0:
            continue
        end = float(np.median(x[-3:]))
        ratio = end / float(x[0])
        if ratio >= min_ratio:
            continue
        out.append(Finding(
            detector="precision_collapse",
            severity=Severity.ERROR,
            message=(f"precision/{layer} collapsed from {x[0]:.3g} to {end:.3g} "
                     f"(ratio {ratio:.2e}): the layer mutes its own prediction errors"),
            where=f"precision/{layer}; the precision floor/regulariser",
            evidence={"ratio": ratio, "start": float(x[0]), "end": end}))
    return out
