"""Detectors on what a model emits across inputs: output/mode collapse, magnitude mismatch,
posterior collapse, tanh saturation, codebook collapse, empty generations."""

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


def posterior_collapse(lm_matched: float, lm_shuffled: float, *, name: str = "soft tokens",
                       min_gap: float = 0.05) -> list[Finding]:
    """A conditioning the consumer ignores: its loss with each input's own conditioning vs with
    the batch's conditionings shuffled across inputs (log 004 V1: the target answered from its
    prior, "math-shaped but unrelated"). ``min_gap=0.05`` nats: a conditioning that carries the
    question must make the answer cheaper to predict than another question's does; under a
    twentieth of a nat per token it carries next to nothing the consumer uses."""
    gap = lm_shuffled - lm_matched
    if gap >= min_gap:
        return []
    return [Finding(
        detector="posterior_collapse", severity=Severity.ERROR,
        message=(f"{name}: the consumer's loss with matched inputs {lm_matched:.4f} vs shuffled "
                 f"across the batch {lm_shuffled:.4f} (gap {gap:+.4f} < {min_gap}): it ignores "
                 "them and answers from its prior"),
        where="the LM term's gradient into the bridge; auxiliary terms satisfied without the "
              "target (a side channel); the soft tokens' placement and scale",
        evidence={"lm_matched": lm_matched, "lm_shuffled": lm_shuffled, "gap": gap})]


def tanh_saturation(pre_tanh_abs: Sequence[float] | np.ndarray, *, name: str = "output tanh",
                    bound: float = 3.0, warn_share: float = 0.1,
                    error_share: float = 0.5) -> list[Finding]:
    """Inputs of a tanh beyond ``bound`` in magnitude: there sech^2 <= sech^2(3) = 0.0099, so
    under 1% of the gradient passes (log 004 V15h: pre-tanh std 14, the LM loss on a plateau).
    Warning above ``warn_share`` of the elements, error above ``error_share``."""
    x = np.abs(np.asarray(pre_tanh_abs, dtype=float)).ravel()
    if x.size == 0:
        return []
    share = float(np.mean(x > bound))
    if share <= warn_share:
        return []
    return [Finding(
        detector="tanh_saturation",
        severity=Severity.ERROR if share > error_share else Severity.WARNING,
        message=(f"{name}: {share:.0%} of {x.size} inputs beyond |x| > {bound} (median |x| "
                 f"{float(np.median(x)):.3g}): the tanh passes < 1% of the gradient there"),
        where=f"the scale of what enters {name} (a LayerNorm before it, a learnable scale after)",
        evidence={"share": share, "median_abs": float(np.median(x))})]


def codebook_collapse(codes: Sequence[int] | np.ndarray, codebook_size: int, *,
                      min_perplexity: float = 10.0) -> list[Finding]:
    """A discrete bottleneck that uses few of its codes: the perplexity exp(H) of the code
    distribution over the evaluated tokens. ``min_perplexity=10``: log 004's VQ/FSQ runs read 1
    when collapsed ("1-10 collapse, > 100 good"); error under 10, warning under a tenth of the
    codes that the tokens could have used (min(codebook, tokens))."""
    c = np.asarray(codes).ravel()
    if c.size == 0:
        return []
    _, counts = np.unique(c, return_counts=True)
    p = counts / counts.sum()
    ppl = float(np.exp(-(p * np.log(p)).sum()))
    reachable = min(codebook_size, c.size)
    if ppl >= max(min_perplexity, 0.1 * reachable):
        return []
    return [Finding(
        detector="codebook_collapse",
        severity=Severity.ERROR if ppl < min_perplexity else Severity.WARNING,
        message=(f"codebook: perplexity {ppl:.1f} over {c.size} tokens ({len(counts)} of "
                 f"{codebook_size} codes used): the bottleneck passes almost one symbol"),
        where="the quantiser's input scale and the codebook's init; an entropy or usage term",
        evidence={"perplexity": ppl, "used": float(len(counts)), "codebook": float(codebook_size)})]


def empty_generations(outputs: Sequence[str], *, name: str = "outputs",
                      warn_share: float = 0.1, error_share: float = 0.5) -> list[Finding]:
    """Generated outputs that are empty (log 004 V10: every output "" from a missing attention
    mask and BOS). Warning above ``warn_share`` of the outputs, error above ``error_share``."""
    if not outputs:
        return []
    share = sum(not o.strip() for o in outputs) / len(outputs)
    if share <= warn_share:
        return []
    return [Finding(
        detector="empty_generations",
        severity=Severity.ERROR if share > error_share else Severity.WARNING,
        message=f"{name}: {share:.0%} of {len(outputs)} generations are empty",
        where="the generation's input layout vs training's (attention mask, BOS, primer)",
        evidence={"share": share})]
