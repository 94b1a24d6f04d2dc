"""Norm traces per named tensor: which columns are norms, and norms that run away.

A norm column is ``act/<layer>`` (activation / state RMS, e.g. ``act/z_star`` = |z*|),
``grad/<param-or-group>``, ``grad_norm``, ``a_norm`` (EP contrast) or ``update/<param-or-group>``.
Update norms are divided by the row's ``lr``, so a warm-up or a decay of the learning rate is not
read as growth or decay of the update itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.health._trace import named, natural_key, series
from models.health.finding import Finding, Severity

NORM_PREFIXES = ("act/", "grad/", "update/")
NORM_KEYS = ("grad_norm", "a_norm")
# what norm_excursions reads: states / activations and the whole model's gradient
EXCURSION_NORMS = ("act/", "grad/global", "grad_norm", "a_norm")


def norm_series(trace: pd.DataFrame) -> dict[str, pd.Series]:
    """``{column: series}`` of every logged norm, update norms per unit learning rate."""
    out: dict[str, pd.Series] = {}
    lr = series(trace, "lr") if "lr" in trace.columns else None
    for prefix in NORM_PREFIXES:
        for name, s in named(trace, prefix).items():
            if prefix == "update/" and lr is not None:
                rate = lr.reindex(s.index)
                s = (s / rate)[(rate > 0).to_numpy()]
            out[prefix + name] = s.dropna()
    for key in NORM_KEYS:
        if key in trace.columns:
            out[key] = series(trace, key)
    return {k: out[k] for k in sorted(out, key=natural_key) if len(out[k])}


def family(name: str) -> str:
    """``act/``, ``grad/``, ``update/`` or the key itself: norms comparable in scale."""
    return name.split("/", 1)[0] if "/" in name else name


def early_levels(norms: dict[str, pd.Series]) -> dict[str, float]:
    """Median of the first quarter of each norm series."""
    return {n: float(np.median(quarters(np.abs(s.to_numpy()))[0])) for n, s in norms.items()}


def start_levels(norms: dict[str, pd.Series], rows: int = 3) -> dict[str, float]:
    """Where each norm started: the median of its first ``rows`` logged values (a quarter of
    the run can already hold an excursion: the GPU protocol's EP without AEP had |z*| at 1.2
    for three rows and at 39-145 by the end of its first quarter)."""
    return {n: float(np.median(np.abs(s.to_numpy()[:rows]))) for n, s in norms.items()}


def family_median(name: str, early: dict[str, float]) -> float:
    """Median early level of the norms of ``name``'s family."""
    peers = [v for k, v in early.items() if family(k) == family(name) and v > 0]
    return float(np.median(peers)) if peers else 0.0


def negligible(name: str, early: dict[str, float], rel_floor: float = 1e-3) -> bool:
    """Whether a norm started at numerical zero relative to its family (e.g. a key bias under
    softmax, whose gradient is rounding noise): below ``rel_floor`` of the family's median early
    level, growth is rounding noise being amplified (Adam normalises it), not a runaway."""
    return early[name] < rel_floor * family_median(name, early)


def quarters(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first quarter, third quarter, last quarter) of a series, each at least one value."""
    q = max(1, x.size // 4)
    return x[:q], x[-2 * q:-q] if x.size >= 2 * q else x[:q], x[-q:]


def runaway_norms(trace: pd.DataFrame, *, growth: float = 10.0, keeps_growing: float = 1.5,
                  fatal_growth: float = 1000.0, min_rows: int = 6) -> list[Finding]:
    """Norms whose late level (median of the last quarter of logged rows) is more than
    ``growth`` times its early level (median of the first quarter, or its family's median early
    level if that is larger) and still rising (the last quarter's median over the third
    quarter's is above ``keeps_growing``).

    Thresholds: ``growth=10``: healthy training moves activation and gradient norms by small
    factors (LayerNorm, weight decay, clipping; BP baselines stay within ~3x), an order of
    magnitude is the issue's bar for a runaway; ``keeps_growing=1.5`` separates a norm that
    settled at a new level (ratio ~1 quarter to quarter) from one still compounding (log 003's EP
    at lr 1e-3: |z*| 29 -> 224 and gradient 15 -> 1,418 within 150 steps). ``fatal_growth=1000``:
    three orders of magnitude leave float32 states with a thousandth of their relative
    resolution, LayerNorm/softmax inputs saturated and Adam's moment estimates stale; the
    numbers the run produces are no longer about the model it started as. The family floor
    keeps a tensor that catches up from a small initialisation silent (measured: BPTT's
    attention-output gradient 0.0035 -> 0.12 while the family's early median is ~0.05). Norms
    that start at
    numerical zero relative to their family are skipped (``negligible``). One finding per
    family (``act``, ``grad``, ``update``, ...) names its runaway tensors, largest growth first.
    """
    runaway: dict[str, list[dict[str, float]]] = {}
    norms = norm_series(trace)
    early_all = early_levels(norms)
    for name, s in norms.items():
        x = np.abs(s.to_numpy())
        if x.size < min_rows or negligible(name, early_all):
            continue
        first, third, last = quarters(x)
        early, mid, late = (float(np.median(v)) for v in (first, third, last))
        if early <= 0 or not np.isfinite(late):
            continue
        # growth over the family's typical early level when this tensor started below it: a
        # tensor catching up from a small initialisation is not running away
        base = max(early, family_median(name, early_all))
        ratio, recent = late / base, late / mid if mid > 0 else np.inf
        if ratio <= growth or recent <= keeps_growing:
            continue
        steps = s.index.to_numpy()
        q = len(first)
        runaway.setdefault(family(name), []).append({
            "name": name, "ratio": ratio, "early": base, "late": late, "recent": recent,
            "early_from": steps[0], "early_to": steps[q - 1], "late_from": steps[-q],
            "late_to": steps[-1]})
    out = []
    for fam, hits in runaway.items():
        hits.sort(key=lambda h: -h["ratio"])
        top = hits[0]
        listed = "; ".join(f"{h['name']} {h['early']:.3g} -> {h['late']:.3g} ({h['ratio']:.3g}x, "
                           f"{h['recent']:.3g}x over the previous quarter)" for h in hits[:5])
        more = f"; and {len(hits) - 5} more" if len(hits) > 5 else ""
        out.append(Finding(
            detector="runaway_norms",
            severity=Severity.FATAL if top["ratio"] > fatal_growth else Severity.ERROR,
            message=(f"{len(hits)} {fam} norm(s) grew more than {growth:g}x from steps "
                     f"{top['early_from']}-{top['early_to']} to steps {top['late_from']}-"
                     f"{top['late_to']} and are still rising: {listed}{more}"),
            where=f"trace columns {', '.join(h['name'] for h in hits[:5])}; the tensors they "
                  "measure and what feeds them (learning rate, stabilisers, the estimator)",
            evidence={"ratio": top["ratio"], "early": top["early"], "late": top["late"],
                      "recent_ratio": top["recent"], "tensors": float(len(hits))}))
    return sorted(out, key=lambda f: -f.evidence["ratio"])


def norm_excursions(trace: pd.DataFrame, *, peak_factor: float = 100.0, stays: float = 10.0,
                    min_rows: int = 6) -> list[Finding]:
    """Norms that ran away for a while and came back, or ran away and stayed: the cases
    ``runaway_norms`` misses because their late level is no longer rising.

    The peak is compared with the start (``start_levels``: the first three logged values; or
    the family's median start if larger, as ``runaway_norms`` floors its early level).
    ``peak_factor=100``: two orders of magnitude above where the tensor started is far outside
    what healthy training does (BP baselines stay within ~3x); it is what the 2k-step GPU
    protocol's EP without AEP did while still "converging" (|z*| 1.2 -> 158 -> 24, gradient
    0.7 -> 603 -> 4.7). Error when the late level (median of the last quarter) is still
    ``stays`` x the start (the run lives at the new scale: runaway_norms' error without the
    "still rising"); warning when it came back (the curve went through a broken phase). One
    finding per family. Only states/activations and whole-model norms (``EXCURSION_NORMS``)
    are read: a single parameter's gradient legitimately rises by orders of magnitude from a
    near-zero start (attention keys under the uniform attention of initialisation: EP's
    grad/attn.k 0.005 -> 0.67 in the same protocol, a healthy run).
    """
    hits: dict[str, list[dict[str, float]]] = {}
    norms = norm_series(trace)
    starts, early_all = start_levels(norms), early_levels(norms)
    for name, s in norms.items():
        x = np.abs(s.to_numpy())
        if (not name.startswith(EXCURSION_NORMS) or x.size < min_rows
                or negligible(name, starts) or not np.isfinite(x).all()):
            continue
        start = max(starts[name], family_median(name, starts))
        first, third, last = quarters(x)
        late, mid = float(np.median(last)), float(np.median(third))
        early = max(float(np.median(first)), family_median(name, early_all))
        still_rising = late / early > 10 and mid > 0 and late / mid > 1.5  # runaway_norms' case
        i_peak = int(np.argmax(x))
        if start <= 0 or x[i_peak] <= peak_factor * start or still_rising:
            continue
        hits.setdefault(family(name), []).append({
            "name": name, "start": start, "peak": float(x[i_peak]),
            "peak_step": float(s.index[i_peak]), "late": late,
            "ratio": float(x[i_peak]) / start, "late_ratio": late / start})
    out = []
    for fam, found in hits.items():
        found.sort(key=lambda h: -h["ratio"])
        top = found[0]
        stayed = any(h["late_ratio"] > stays for h in found)
        listed = "; ".join(f"{h['name']} {h['start']:.3g} -> {h['peak']:.3g} at step "
                           f"{h['peak_step']:.0f} ({h['ratio']:.3g}x), late {h['late']:.3g}"
                           for h in found[:5])
        out.append(Finding(
            detector="norm_excursion", severity=Severity.ERROR if stayed else Severity.WARNING,
            message=(f"{len(found)} {fam} norm(s) peaked more than {peak_factor:g}x above their "
                     f"start and " + ("stayed more than " f"{stays:g}x above it" if stayed else
                                     "came back") + f": {listed}"),
            where=f"trace columns {', '.join(h['name'] for h in found[:5])} around step "
                  f"{top['peak_step']:.0f}; the losses and cosines at that time",
            evidence={"ratio": top["ratio"], "peak": top["peak"], "start": top["start"],
                      "late_ratio": top["late_ratio"], "tensors": float(len(found))}))
    return sorted(out, key=lambda f: -f.evidence["ratio"])


def growing_norms(trace: pd.DataFrame, since_step: float, *, factor: float = 3.0,
                  ) -> list[tuple[str, float, float, float]]:
    """``(column, level at since_step, late level, ratio)`` of the norms whose late median is
    more than ``factor`` times their value at ``since_step`` (nearest logged row), largest first.
    Used as the corroborating evidence of a divergence."""
    out = []
    norms = norm_series(trace)
    early_all = early_levels(norms)
    for name, s in norms.items():
        if negligible(name, early_all):
            continue
        x, steps = np.abs(s.to_numpy()), s.index.to_numpy()
        after = x[steps >= since_step]
        if x.size < 3 or after.size < 2:
            continue
        at = float(np.median(after[:3]))  # the best step and its next rows: one row is noisy
        late = float(np.median(quarters(x)[2]))
        if at > 0 and late > factor * at:
            out.append((name, at, late, late / at))
    return sorted(out, key=lambda t: -t[3])
