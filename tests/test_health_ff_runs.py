"""Health detectors on failures made by the feed-forward studies' own code (calibrate -> train
-> diagnose in-process, MNIST-1D generated offline): a DFA rule whose hidden credit is replaced
by noise learns nothing beyond its head, one whose credit has the wrong sign is flagged by group,
and PC inference capped far too low settles at its cap. False positives: BP rows of the
vision, ladder and LQ studies raise nothing of warning or worse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import health_runs as hr
import pytest
import torch

from models.ff.rules.dfa import DFA

TRAIN = {"batch_size": 100, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.0,
         "grad_clip": 1.0, "log_every": 6, "eval_every": 36, "eval_batches": 1,
         "live_guard": True}  # no run here has a fatal finding, so the guard must not stop any


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One project directory with MNIST-1D (2,000 samples) for every run of this module."""
    with hr.project(tmp_path_factory.mktemp("ff_runs")) as path:
        hr.write_mnist1d(2000)
        yield path


def vision(row: str, rule: dict[str, Any], epochs: int) -> dict[str, Any]:
    return hr.params({"rules_vision": {
        "rows": [row], "epochs": epochs,
        "model": {"width": 32, "depth": 2, "block_layers": 2, "d_ff": 64},
        "train": TRAIN, "task": {"dataset": "mnist1d", "val_fraction": 0.1},
        "rules": {row: rule}}}, threads=1)


def test_noise_credit_learns_nothing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DFA's hidden credit replaced by noise of the same RMS: the hidden layers random-walk and
    the row ends no better than the head trained alone on the initial features at its budget."""
    honest = DFA.credits_from
    gen = torch.Generator().manual_seed(0)  # the noise does not depend on what ran before

    def noise(self: DFA, hs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        return [torch.randn(c.shape, generator=gen) * c.pow(2).mean().sqrt()
                for c in honest(self, hs, y)]

    monkeypatch.setattr(DFA, "credits_from", noise)
    diag = hr.run(vision("dfa", {"kind": "dfa"}, epochs=5), "rules_vision", "dfa")
    found = [f for f in hr.findings(diag, "error") if f["detector"] == "learns_nothing"]
    assert found, hr.show(diag["health"])
    f = found[0]
    assert f["run"] == "rules_vision/dfa/seed0" and "head_only" in f["message"]
    assert "test_accuracy" in f["where"] and f["evidence"]["gain"] <= 2 * f["evidence"]["se"]


def test_wrong_sign_credit_is_named_by_layer(workdir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Credit = minus BP's dL/dh for every hidden layer: each layer's update points uphill, and
    estimator_sign names the layers (Gamma per layer, measured by diagnose on test data)."""
    def uphill(self: DFA, hs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, h in enumerate(hs):
            h = h.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.net.loss_from(i, h, y), h)
            out.append(-g)
        return out

    monkeypatch.setattr(DFA, "credits_from", uphill)
    rule = {"kind": "dfa", "feedback_scale": 1.0}
    diag = hr.run(vision("dfa", rule, epochs=2), "rules_vision", "dfa")
    signs = [f for f in hr.findings(diag, "error") if f["detector"] == "estimator_sign"]
    named = {f["message"].split(" = ")[0].split()[-1] for f in signs}
    assert {"gamma/inp", "gamma/block1", "gamma/block2"} <= named, hr.show(diag["health"])
    assert all(f["evidence"]["cos"] < -0.5 for f in signs)


def test_pc_capped_far_too_low_settles_at_cap(workdir: Path) -> None:
    rule = {"kind": "pc", "calibrate_settle": False, "settle_iters": 2, "settle_tol": 1e-4}
    diag = hr.run(vision("pc", rule, epochs=1), "rules_vision", "pc")
    (f,) = [f for f in diag["health"] if f["detector"] == "settling_at_cap"]
    assert f["severity"] == "error" and f["run"] == "rules_vision/pc/seed0"
    assert "inference loop" in f["message"] and "cap of 2" in f["message"]
    assert f["evidence"]["share"] == 1.0 and f["evidence"]["residual_median"] > 1e-4


def test_bp_rows_of_every_ff_study_are_silent(workdir: Path) -> None:
    runs = {
        "rules_vision": vision("bp", {"kind": "bp"}, epochs=10),
        "rules_ladder": hr.params({"rules_ladder": {
            "rows": ["bp"], "epochs": 5, "model": {"d": 16}, "train": TRAIN,
            "task": {"alphas": [0.0, 1.0], "depths": [2], "n_train": 1000, "n_test": 500},
            "rules": {"bp": {"kind": "bp"}}}}, threads=1),
        "rules_lq": hr.params({"rules_lq": {
            "rows": ["bp"], "epochs": 5, "model": {"depth": 2, "d": 16},
            "train": {**TRAIN, "batch_size": 64},
            "task": {"d_in": 16, "d_out": 8, "n_train": 1024, "n_test": 512, "noise": 0.1},
            "rules": {"bp": {"kind": "bp"}}}}, threads=1),
    }
    for study, p in runs.items():
        diag = hr.run(p, study, "bp")
        assert hr.findings(diag) == [], f"{study}:\n{hr.show(diag['health'])}"
