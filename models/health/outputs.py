"""Detectors on what a model emits across inputs: output/mode collapse, magnitude mismatch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from models.health.finding import Finding, Severity


def output_collapse(outputs: Sequence[str] | np.ndarray, name: str = "outputs", *,
                    min_unique: float = 0.5, min_spread: float = 0.05) -> list[Finding]:
    """Identical outputs across different inputs.

    Strings: fraction of distinct outputs (log 004: 20/20 identical; its bar was >50% unique,
    hence ``min_unique=0.5``). Arrays ``[N, ...]`` (e.g. soft tokens per input): RMS of the
    deviation from the across-input mean over the overall RMS; ``min_spread=0.05``: inputs that
    differ by under 5% of the signal are indistinguishable to the consumer.
    """
    if len(outputs) < 2:
        return []
    if isinstance(outputs, np.ndarray) or not isinstance(outputs[0], str):
        x = np.asarray(outputs, dtype=float).reshape(len(outputs), -1)
        total = float(np.sqrt(np.mean(x**2)))
        dev = float(np.sqrt(np.mean((x - x.mean(axis=0)) ** 2)))
        spread = dev / total if total > 0 else 0.0
        if spread >= min_spread:
            return []
        return [Finding(
            detector="output_collapse",
            severity=Severity.ERROR,
            message=(f"{name}: across {len(x)} inputs the variation is {spread:.2e} of the "
                     f"signal RMS {total:.3g}: the same output for every input (mode collapse)"),
            where=f"extras['{name}']; whether the source reaches it (masks, pooling, attention)",
            evidence={"spread": spread, "rms": total, "inputs": float(len(x))})]
    unique = len(set(outputs))
    frac = unique / len(outputs)
    if frac >= min_unique:
        return []
    return [Finding(
        detector="output_collapse",
        severity=Severity.ERROR if unique == 1 else Severity.WARNING,
        message=(f"{name}: {unique} distinct of {len(outputs)} ({frac:.0%}) across inputs; "
                 f"most common: {max(set(outputs), key=list(outputs).count)[:60]!r}"),
        where=f"extras['{name}']; whether the conditioning is used (posterior/mode collapse)",
        evidence={"unique_fraction": frac, "unique": float(unique)})]


def magnitude_mismatch(rms: Mapping[str, tuple[float, float]], *, max_ratio: float = 3.0,
                       error_ratio: float = 10.0) -> list[Finding]:
    """RMS of what is fed into a space vs the RMS that space expects, per connection
    ``{"bridge->tgt_embed": (rms_fed, rms_expected)}``.

    Defaults: ``max_ratio=3``: within 3x is ordinary init/layer variation; ``error_ratio=10``:
    an order of magnitude saturates softmax/LayerNorm downstream (log 004: 33x).
    """
    out = []
    for name, (fed, expected) in rms.items():
        if fed <= 0 or expected <= 0:
            ratio = np.inf if max(fed, expected) > 0 else 1.0
        else:
            ratio = max(fed / expected, expected / fed)
        if ratio <= max_ratio:
            continue
        out.append(Finding(
            detector="magnitude_mismatch",
            severity=Severity.ERROR if ratio > error_ratio else Severity.WARNING,
            message=(f"{name}: fed RMS {fed:.3g} vs expected {expected:.3g} "
                     f"({ratio:.1f}x {'too loud' if fed > expected else 'too quiet'})"),
            where=f"extras['rms']['{name}']; output scaling at the connection (e.g. tanh * "
                  "target RMS)",
            evidence={"ratio": float(ratio), "fed": float(fed), "expected": float(expected)}))
    return out
