"""Detectors on whether a run learned: worse than chance, divergence, learns nothing.

They read the loss trace and references that calibration records for the same data by the same
pipeline (``calibration.json["health"]``, see ``Reference``):

- ``chance``: the uninformed loss on the training-loss scale: ln V for a language model (uniform
  next-token guess), ln C for a classifier, the constant (mean) predictor's MSE for a regression;
- ``untrained``: the same net at initialisation on the same loss;
- ``baselines``: held-out metrics of a constant predictor, the untrained net and the head trained
  alone on the frozen initial features, each with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from models.health._trace import series
from models.health.finding import Finding, Severity
from models.health.norms import growing_norms, quarters

LOSS_COLUMNS = ("loss", "val_loss")


@dataclass(frozen=True)
class Baseline:
    """A held-out metric a row must beat. ``must_beat=False`` (e.g. the head alone on a task that
    is linear by construction, where it is already optimal) only flags rows clearly worse."""

    name: str
    metric: str
    value: float
    se: float
    higher_is_better: bool
    must_beat: bool = True
    what: str = ""
    context: bool = False  # a model of the previous token only (the bigram): "learns no context"
    judged: bool = True  # False: a reference row of the table (the trigram), not a health bar
    margin: float = 0.0  # how far beyond the baseline "better" starts (besides z SE)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Baseline:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def worse_than_chance(trace: pd.DataFrame, chance: float, *, what: str = "",
                      untrained: float | None = None, margin: float = 0.05,
                      fatal_factor: float = 1.5) -> list[Finding]:
    """Late ``loss`` / ``val_loss`` (median of the last quarter of logged values) above the
    uninformed baseline ``chance``; or, when the late level is fine, an excursion above it
    after the run had learned (``_chance_excursion``).

    Thresholds: ``margin=0.05``: a median of several batch losses scatters by a few percent
    around its level, and a run that ends within 5% of guessing has learned nothing anyway (that
    is ``learns_nothing``'s business); above it the model is worse than not trying (error).
    ``fatal_factor=1.5``: 1.5x the larger of chance and the untrained net's loss means confident
    wrong predictions the model did not start with (log 003's 1.5 ln V explosion bar): its
    numbers are meaningless (fatal).
    """
    out = []
    for col in LOSS_COLUMNS:
        if col not in trace.columns:
            continue
        s = series(trace, col)
        if s.empty:
            continue
        last = quarters(s.to_numpy())[2]
        late = float(np.median(last))
        steps = s.index.to_numpy()[-len(last):]
        if not late > chance * (1 + margin):
            out += _chance_excursion(s, col, chance, what, untrained, margin, fatal_factor)
            continue
        bar = fatal_factor * max(chance, untrained or 0.0)
        fatal = late > bar
        out.append(Finding(
            detector="worse_than_chance",
            severity=Severity.FATAL if fatal else Severity.ERROR,
            message=(f"{col} {late:.4g} (median of steps {steps[0]}-{steps[-1]}) is "
                     f"{late / chance:.2f}x the uninformed baseline {chance:.4g}"
                     + (f" ({what})" if what else "")
                     + (f", beyond {fatal_factor:g}x of it and of the untrained net: the "
                        "numbers are meaningless" if fatal else ": worse than not learning")),
            where=f"trace column {col}; the learning rate, the estimator's gradient sign, "
                  "the state and gradient norms (divergence / runaway_norms)",
            evidence={"late": late, "chance": chance, "ratio": late / chance,
                      "first_step": float(steps[0]), "last_step": float(steps[-1])}))
    return out


def _chance_excursion(s: pd.Series, col: str, chance: float, what: str,
                      untrained: float | None, margin: float,
                      fatal_factor: float) -> list[Finding]:
    """A run that had learned (a value below chance) and later went worse than chance again,
    even if it came back by the end: a training phase whose numbers meant nothing (the 2k-step
    GPU protocol's EP without AEP: val CE 3.32 -> 12.5 -> 2.61 while |z*| ran to 158). One
    validation row is an average over several batches and counts alone; the training loss is
    one batch, so it needs two consecutive rows. Error when the excursion passes
    ``fatal_factor`` x chance (confident wrong predictions mid-run), else warning."""
    x, steps = s.to_numpy(), s.index.to_numpy()
    below = np.flatnonzero(x < chance * (1 - margin))  # learned: clearly below chance
    if below.size == 0:
        return []
    over = x > chance * (1 + margin)
    over[: below[0]] = False
    if col == "loss":  # one batch per row: a neighbouring row must be over too
        prev, nxt = np.r_[False, over[:-1]], np.r_[over[1:], False]
        over = over & (prev | nxt)
    if not over.any():
        return []
    i_peak = int(np.argmax(np.where(over, x, -np.inf)))
    i_best = int(np.argmin(x[: np.flatnonzero(over)[0]]))  # the best before it went back
    peak, bar = float(x[i_peak]), fatal_factor * max(chance, untrained or 0.0)
    where_over = steps[over]
    return [Finding(
        detector="worse_than_chance",
        severity=Severity.ERROR if peak > bar else Severity.WARNING,
        message=(f"{col} went back above the uninformed baseline {chance:.4g}"
                 + (f" ({what})" if what else "")
                 + f" after reaching {float(x[i_best]):.4g} at step {steps[i_best]}: "
                 f"{peak:.4g} ({peak / chance:.2f}x) at step {steps[i_peak]}, "
                 f"{int(over.sum())} logged row(s) in steps {where_over[0]}-{where_over[-1]}; "
                 f"it ended at {float(x[-1]):.4g}" + (": a phase of meaningless numbers, the "
                                                      "row's result is suspect" if peak > bar
                                                      else "")),
        where=f"trace column {col} around step {steps[i_peak]}; the norms and the estimator's "
              "cosines at that time (runaway_norms, estimator_sign)",
        evidence={"peak": peak, "peak_step": float(steps[i_peak]), "chance": chance,
                  "ratio": peak / chance, "rows_over": float(over.sum()),
                  "final": float(x[-1])})]


def divergence(trace: pd.DataFrame, *, rise: float = 0.5, give_back: float = 0.5,
               norm_factor: float = 3.0, min_rows: int = 6) -> list[Finding]:
    """The loss's late level well above its best, i.e. training went backwards.

    Best = minimum of the 3-row running median (one noisy batch is not a best); late = median of
    the last quarter. Fires when late > (1 + ``rise``) * best *and* late - best exceeds
    ``give_back`` of what was learned (first - best): a 50% relative rise that also returns half
    the progress is no plateau noise (a converged run sits within a few percent of its best).
    Error when norms (``act/*``, ``grad*``, ``update/*`` per lr) grew more than ``norm_factor``
    since the best step: the divergence the issue's EP run shows (|z*| 0.7 -> 254, gradient
    0.4 -> 2,862); warning when no norm grew (overfitting / schedule, look at it).
    """
    out = []
    for col in LOSS_COLUMNS:
        if col not in trace.columns:
            continue
        s = series(trace, col)
        if s.size < (min_rows if col == "loss" else 3):
            continue
        x, steps = s.to_numpy(), s.index.to_numpy()
        smooth = pd.Series(x).rolling(3, center=True, min_periods=1).median().to_numpy()
        i_best = int(np.argmin(smooth))
        last = quarters(x)[2]
        if i_best >= x.size - len(last):
            continue
        best, late, first = float(smooth[i_best]), float(np.median(last)), float(x[0])
        if not (late > (1 + rise) * best and late - best > give_back * max(first - best, 0.0)):
            continue
        grown = growing_norms(trace, steps[i_best], factor=norm_factor)
        names = "; ".join(f"{n} {a:.3g} -> {b:.3g} ({r:.3g}x)" for n, a, b, r in grown[:4])
        out.append(Finding(
            detector="divergence",
            severity=Severity.ERROR if grown else Severity.WARNING,
            message=(f"{col} rose from its best {best:.4g} at step {steps[i_best]} to "
                     f"{late:.4g} late (steps {steps[-len(last)]}-{steps[-1]}; it started at "
                     f"{first:.4g})" + (f", while norms grew since the best step: {names}"
                                         if grown else ", with no norm growing (overfitting or "
                                         "the schedule?)")),
            where=f"trace column {col}" + (f" and {', '.join(n for n, *_ in grown[:4])}"
                                           if grown else "") + "; the learning rate / stabilisers",
            evidence={"best": best, "best_step": float(steps[i_best]), "late": late,
                      "first": first, "norms_grown": float(len(grown)),
                      **({"top_norm_ratio": grown[0][3]} if grown else {})}))
    return out


def learns_nothing(metrics: Mapping[str, Any], baselines: Sequence[Baseline | Mapping[str, Any]],
                   *, z: float = 2.0) -> list[Finding]:
    """A held-out metric no better than a baseline measured by the same pipeline on the same
    data (constant predictor, untrained net, the head trained alone on frozen initial features,
    a bigram model for a language model).

    ``z=2``: "better" means beyond two standard errors of the baseline's held-out estimate
    (one-sided, ~2% false alarms per comparison from test-set noise alone). A baseline with
    ``must_beat`` is an error when not beaten; one without (the head alone on a linear task)
    is an error only when the row is worse by more than that margin (the rule's hidden credit
    actively destroys what the head alone achieves). A baseline's ``margin`` raises the bar:
    better means by more than both. A ``context`` baseline (the bigram) not beaten by its margin
    says the row "learns no context": it predicts the next token from the current one, whatever
    its architecture (the 2k-step GPU protocol's equilibrium rows at ff7c04e: val CE 2.50-2.51,
    0.03-0.04 nats under a character bigram's 2.54, while the trigram is at 2.03). Baselines with
    ``judged`` false are reference rows of the table only.
    """
    failed: dict[str, list[tuple[Baseline, float, float, bool]]] = {}
    for raw in baselines:
        b = raw if isinstance(raw, Baseline) else Baseline.from_dict(raw)
        value = metrics.get(b.metric)
        if not b.judged or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        sign = 1.0 if b.higher_is_better else -1.0
        gain = sign * (float(value) - b.value)  # > 0: better than the baseline
        worse = gain < -z * b.se
        if gain > max(z * b.se, b.margin) or (not b.must_beat and not worse):
            continue
        failed.setdefault(b.metric, []).append((b, float(value), gain, worse))
    out = []
    for metric, hits in failed.items():
        value = hits[0][1]
        parts = [f"{'worse than' if worse else 'no better than'} the {b.name} baseline "
                 f"{b.value:.4g} ± {b.se:.2g} ({b.what or b.name}; difference "
                 f"{gain * (1 if b.higher_is_better else -1):+.4g}, {z:g} SE = {z * b.se:.2g}"
                 + (f", needed {b.margin:.3g}" if b.margin > z * b.se else "") + ")"
                 for b, _, gain, worse in hits]
        worst = min(hits, key=lambda h: h[2])
        # "no context" where only the context baseline holds the row back (else: nothing learned)
        context = hits[0][0] if len(hits) == 1 and hits[0][0].context else None
        head = (f"learns no context: held-out {metric} {value:.4g} against the {context.name}'s "
                f"{context.value:.4g}; it is " if context is not None
                else f"held-out {metric} {value:.4g} is ")
        out.append(Finding(
            detector="learns_nothing", severity=Severity.ERROR,
            message=head + "; ".join(parts),
            where=f"diagnostics metric {metric} vs calibration baselines "
                  f"{', '.join(h[0].name for h in hits)}; "
                  + ("whether the model uses the tokens before the current one (attention "
                     "strength, the interaction's share of the state)" if context is not None
                     else "whether the rule's credit reaches the hidden layers with the right "
                          "sign and scale"),
            evidence={"value": value, "baseline": worst[0].value, "se": worst[0].se,
                      "gain": worst[2], "baselines": float(len(hits)),
                      **({"context_baseline": context.value} if context is not None else {})}))
    return out
