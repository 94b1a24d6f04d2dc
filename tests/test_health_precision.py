"""Planted precision bugs: undamped coupled precision updates (log 000, late divergence) and
precision learned without a floor (log 001, the net mutes its own errors)."""

from __future__ import annotations

import pandas as pd
import torch

from models.health.precision import precision_collapse, precision_instability


def _coupled_precisions(damping: float, steps: int = 500, eta: float = 0.1,
                        coupling: float = 4.6) -> pd.DataFrame:
    """Two layers sharing a prediction error: raising layer 2's precision pulls the shared state
    toward layer 2 and inflates layer 1's error, while raising layer 1's shrinks layer 2's.
    Each log-precision moves toward the ML value -log <e^2>; ``damping`` is the regulariser
    toward the prior log-precision. Undamped, the rotation-like coupling grows slowly
    (|eig| = 1.01) and blows up late; damped, |eig| = 0.97."""
    gen = torch.Generator().manual_seed(0)
    s = torch.zeros(2, dtype=torch.float64)
    rows = []
    for step in range(steps):
        chi = torch.randn(2, 256, generator=gen, dtype=torch.float64) ** 2
        err2 = torch.stack([(coupling * s[1]).exp() * chi[0].mean(),
                            (-coupling * s[0]).exp() * chi[1].mean()])
        s = s + eta * (-err2.log() - s) - eta * damping * s
        rows.append({"step": step, "precision/layer1": s[0].exp().item(),
                     "precision/layer2": s[1].exp().item()})
    return pd.DataFrame(rows)


def test_undamped_coupled_precision_diverges_late() -> None:
    trace = _coupled_precisions(damping=0.0)
    early = trace.iloc[:250]
    assert early[["precision/layer1", "precision/layer2"]].max().max() < 3  # fine early on
    found = precision_instability(trace)
    assert {f.message.split()[0] for f in found} == {"precision/layer1", "precision/layer2"}
    assert all(f.evidence["peak_ratio"] > 10 for f in found)


def test_damped_coupled_precision_is_clean() -> None:
    trace = _coupled_precisions(damping=0.5)
    assert precision_instability(trace) == []
    assert precision_collapse(trace) == []


def _pc_layer_precision(floor: float, steps: int = 300) -> pd.DataFrame:
    """Precision learned by descending the energy pi * e^2 / 2 alone (no -log pi term): the
    cheapest way down is pi -> 0. Kept non-negative (floor 0), it mutes the layer; the fix
    is a positive floor."""
    torch.manual_seed(0)
    w = torch.nn.Linear(4, 4)
    pi = torch.ones((), requires_grad=True)
    opt = torch.optim.SGD([*w.parameters(), pi], lr=0.05)
    rows = []
    for step in range(steps):
        x = torch.randn(32, 4)
        err = x.roll(1, dims=1) + torch.randn(32, 4) - w(x)
        energy = 0.5 * (pi * err.pow(2).sum(1)).mean()
        opt.zero_grad()
        energy.backward()
        opt.step()
        with torch.no_grad():
            pi.clamp_(min=floor)
        rows.append({"step": step, "precision/layer1": pi.item()})
    return pd.DataFrame(rows)


def test_precision_without_floor_collapses() -> None:
    (f,) = precision_collapse(_pc_layer_precision(floor=0.0))
    assert "precision/layer1" in f.message and f.evidence["ratio"] < 0.01


def test_precision_with_floor_is_clean() -> None:
    assert precision_collapse(_pc_layer_precision(floor=0.1)) == []
