"""Planted log-000 DTP bugs: targets routed into 32 of 512 slots; inverses contracting 0.8/layer."""

from __future__ import annotations

import pandas as pd
import torch

from models.health import Severity, run_all
from models.health.recorders import slot_coverage
from models.health.signals import low_coverage, vanishing_through_depth

SLOTS, LANGUAGE = 512, slice(0, 32)


def _world_model_targets(routed: bool, steps: int = 5) -> tuple[pd.DataFrame, dict]:
    """DTP top target for a 512-slot state; the bug indexes only the language slots."""
    torch.manual_seed(0)
    readout = torch.nn.Linear(SLOTS, 10)
    rows, ever = [], None
    for step in range(steps):
        h = torch.randn(8, SLOTS, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(readout(h), torch.randint(0, 10, (8,)))
        (grad,) = torch.autograd.grad(loss, h)
        target = h.detach().clone()
        if routed:
            target[:, LANGUAGE] -= 0.5 * grad[:, LANGUAGE]
        else:
            target -= 0.5 * grad
        cov = slot_coverage(target - h.detach(), slot_dim=-1)
        ever = cov.mask if ever is None else ever | cov.mask
        rows.append({"step": step, "loss": loss.item(), "coverage/state": cov.fraction})
    return pd.DataFrame(rows), {"coverage_slots": {"state": ever}}


def test_sliced_targets_name_the_slots() -> None:
    trace, extras = _world_model_targets(routed=True)
    (f,) = low_coverage(trace, extras["coverage_slots"])
    assert f.severity == Severity.ERROR
    assert f.evidence["covered"] == 32 and f.evidence["slots"] == 512
    assert "coverage/state" in f.message and "0-31" in f.message and "32-511" in f.message
    assert any(g.detector == "low_coverage" for g in run_all(trace, extras))


def test_all_slots_routed_is_clean() -> None:
    trace, extras = _world_model_targets(routed=False)
    assert low_coverage(trace, extras["coverage_slots"]) == []


def _dtp_chain(contracting: bool, layers: int = 6, width: int = 16,
               steps: int = 10) -> pd.DataFrame:
    """Difference target propagation tau_l = h_l + g(tau_{l+1}) - g(h_{l+1}) through 5 inverses."""
    gen = torch.Generator().manual_seed(1)
    fw = [torch.randn(width, width, generator=gen) / width**0.5 for _ in range(layers - 1)]
    q = [torch.linalg.qr(torch.randn(width, width, generator=gen))[0] for _ in range(layers - 1)]
    v = [torch.randn(width, width, generator=gen) / width**0.5 for _ in range(layers - 1)]
    head = torch.randn(width, 3, generator=gen)
    rows = []
    for step in range(steps):
        hs = [torch.randn(32, width, generator=gen)]
        for w in fw:
            hs.append(torch.tanh(hs[-1] @ w))
        top = hs[-1].clone().requires_grad_(True)
        y = torch.randint(0, 3, (32,), generator=gen)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(top @ head, y), top)
        taus = [hs[-1] - 1.0 * grad]
        for layer in range(layers - 2, -1, -1):
            if contracting:  # log 000's inverse: a 0.8 contraction per layer
                def g(t: torch.Tensor, layer: int = layer) -> torch.Tensor:
                    return 0.8 * t @ q[layer]
                diff = g(taus[0]) - g(hs[layer + 1])
            else:  # fix: residual inverse, difference renormalised to the incoming norm
                def g(t: torch.Tensor, layer: int = layer) -> torch.Tensor:
                    return t + 0.1 * torch.tanh(t @ v[layer])
                diff = g(taus[0]) - g(hs[layer + 1])
                incoming = (taus[0] - hs[layer + 1]).norm(dim=1, keepdim=True)
                diff = diff * incoming / diff.norm(dim=1, keepdim=True)
            taus.insert(0, hs[layer] + diff)
        rows.append({"step": step} | {f"target/layer{i}": (t - h).norm(dim=1).mean().item()
                                      for i, (t, h) in enumerate(zip(taus, hs, strict=True))})
    return pd.DataFrame(rows)


def test_contracting_inverses_vanish_with_ratio_0_33() -> None:
    (f,) = vanishing_through_depth(_dtp_chain(contracting=True))
    assert abs(f.evidence["ratio"] - 0.8**5) < 0.02
    assert abs(f.evidence["per_layer"] - 0.8) < 0.01 and f.evidence["layers"] == 5
    assert "target/layer5" in f.message and "target/layer0" in f.message


def test_normalised_residual_inverses_keep_targets() -> None:
    assert vanishing_through_depth(_dtp_chain(contracting=False)) == []
