"""Cheap statistics computed from torch objects during training, logged under the CONVENTIONS
prefixes and read later by the detectors. Call them on logging steps, not every step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


def rms(t: torch.Tensor) -> float:
    """Root mean square of a tensor (``act/<layer>``, soft-token vs embedding scale)."""
    return float(t.detach().float().pow(2).mean().sqrt())


@dataclass(frozen=True)
class SlotCoverage:
    fraction: float
    mask: np.ndarray  # bool per slot: received any nonzero entry

    @property
    def covered(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


def slot_coverage(t: torch.Tensor, slot_dim: int = -1, tol: float = 0.0) -> SlotCoverage:
    """Which slots along ``slot_dim`` of a target/gradient tensor hold any entry above ``tol``
    (``coverage/<name>`` = fraction). OR masks over steps to see slots ever reached."""
    moved = t.detach().movedim(slot_dim, 0).reshape(t.shape[slot_dim], -1)
    mask = (moved.abs() > tol).any(dim=1).cpu().numpy()
    return SlotCoverage(float(mask.mean()) if mask.size else 1.0, mask)


@dataclass(frozen=True)
class TermGrad:
    norm: float
    no_grad_path: bool


def term_grad_norm(term: torch.Tensor | float, params: Sequence[torch.Tensor]) -> TermGrad:
    """Gradient norm of one loss term w.r.t. ``params`` (``termgrad/<name>``), keeping the graph
    for the real backward. A term without a graph to any of them, such as
    ``torch.tensor(python_float)``, gives ``TermGrad(0.0, no_grad_path=True)``."""
    trainable = [p for p in params if p.requires_grad]
    if not isinstance(term, torch.Tensor) or not term.requires_grad or not trainable:
        return TermGrad(0.0, True)
    grads = torch.autograd.grad(term.sum(), trainable, retain_graph=True, allow_unused=True)
    present = [g for g in grads if g is not None]
    if not present:
        return TermGrad(0.0, True)
    return TermGrad(float(torch.sqrt(sum(g.float().pow(2).sum() for g in present))), False)


def grad_norms(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """``grad/<name>`` for each parameter that has a gradient after ``backward``."""
    return {f"grad/{n}": float(p.grad.norm()) for n, p in named_params if p.grad is not None}


def gradient_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine between two gradient lists, e.g. the same estimator on two batches (EP batch
    self-coherence) or an estimator vs BP."""
    fa = torch.cat([x.detach().reshape(-1).double() for x in a])
    fb = torch.cat([x.detach().reshape(-1).double() for x in b])
    denom = fa.norm() * fb.norm()
    return float(fa @ fb / denom) if denom > 0 else 0.0


@contextmanager
def activation_rms(model: torch.nn.Module,
                   names: Sequence[str] | None = None) -> Iterator[dict[str, float]]:
    """Within the block, every forward of the named submodules (default: the leaf modules)
    records ``act/<name>`` = RMS of its tensor output into the yielded dict."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and not list(m.children())]
    stats: dict[str, float] = {}
    handles = []
    for name in names:
        def hook(_m: torch.nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                stats[f"act/{name}"] = rms(out)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
