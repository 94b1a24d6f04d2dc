"""The credit-quality metrics of METHODS §3, defined once.

- ``bp_cosine``: cosine between a rule's weight update and the BP gradient per layer (all of a
  layer's parameters flattened together), plus ``mean`` over hidden layers = Gamma.
- ``rho``: Pearson correlation, per layer, between the rule's credit and the true dL/dh_l over all
  batch x unit entries; ``mean`` over layers.
- ``nudge``: relative loss change (L(h_l - eps * rms(h_l) * c_l / rms(c_l)) - L) / L when only h_l
  is moved along the credit and the rest of the net runs forward; negative is good, ~ -eps * cos
  * rms(h) * ||g|| / (rms * L) for small eps.
- ``costate_cosine``: cosine between an estimated credit and the exact costate (toy LQ), per
  layer and mean, entries of each layer flattened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float((a @ b) / (a.norm() * b.norm() + eps))


def correlation(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return cosine(a - a.mean(), b - b.mean())


def _mean(vals: dict[str, float]) -> float:
    return sum(vals.values()) / max(len(vals), 1)


def layer_grads(groups: dict[str, list[nn.Parameter]]) -> dict[str, Tensor]:
    """Flattened ``p.grad`` per layer (missing grads count as zeros), cloned."""
    out = {}
    for name, ps in groups.items():
        out[name] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                               .detach().reshape(-1) for p in ps]).clone()
    return out


def bp_cosine(rule: dict[str, Tensor], bp: dict[str, Tensor],
              exclude: Sequence[str] = ("head",)) -> dict[str, float]:
    """Per-layer cosine and ``mean`` (Gamma) over layers not in ``exclude``."""
    per = {k: cosine(rule[k], bp[k]) for k in bp}
    return {**per, "mean": _mean({k: v for k, v in per.items() if k not in exclude})}


def rho(credits: Sequence[Tensor], true: Sequence[Tensor]) -> dict[str, float]:
    per = {str(i): correlation(c, g) for i, (c, g) in enumerate(zip(credits, true, strict=True))}
    return {**per, "mean": _mean(per)}


@torch.no_grad()
def nudge(loss_from: Callable[[int, Tensor], Tensor], hs: Sequence[Tensor],
          credits: Sequence[Tensor], eps: float = 1e-2) -> dict[str, float]:
    """``loss_from(l, h)``: the loss when h_l is replaced by h (e.g. DeepMLP.loss_from)."""
    per = {}
    for i, (h, c) in enumerate(zip(hs, credits, strict=True)):
        base = float(loss_from(i, h))
        step = eps * h.pow(2).mean().sqrt() * c / (c.pow(2).mean().sqrt() + 1e-12)
        per[str(i)] = (float(loss_from(i, h - step)) - base) / (abs(base) + 1e-12)
    return {**per, "mean": _mean(per)}


def costate_cosine(est: Sequence[Tensor], exact: Sequence[Tensor]) -> dict[str, float]:
    per = {str(i): cosine(a, b) for i, (a, b) in enumerate(zip(est, exact, strict=True))}
    return {**per, "mean": _mean(per)}
