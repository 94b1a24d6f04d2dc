"""Difference target propagation (Lee et al. 2015) with residual, normalised learned inverses.

Targets, top-down, with f_{l+1}: h_l -> h_{l+1} the forward layer and g_l: h_{l+1} -> h_l its
learned inverse:

    tau_L = h_L - eta * B * dL/dh_L            (B = batch size: per-sample output gradient)
    tau_l = h_l + g_l(tau_{l+1}) - g_l(h_{l+1})

Each layer minimises ||h_l - tau_l||^2 / (2 eta B) through its own parameters, i.e. its local
credit is (h_l - tau_l) / (eta B); at the top this is exactly dL/dh_L, so update scales match BP.

Inverses have the forward block's architecture (h + f(LN(h)): residual connection plus
normalisation) so they start near the identity and do not contract target differences through
depth (log 000: 0.8 per layer leaves 0.8^5 = 0.33). They are trained by the difference
reconstruction loss on noise-perturbed inputs, which makes the *difference* correction exact
around the current h_l:

    L_rec,l = || g_l(f_{l+1}(h_l + n)) - g_l(f_{l+1}(h_l)) - n ||^2 / sigma^2,  n ~ N(0, sigma^2 I)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.config.ff_rules.dtp import FFDTPRule
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms, make_block
from models.ff.rules.base import Rule


class DTP(Rule):
    name = "dtp"

    def __init__(self, net: DeepMLP, cfg: FFDTPRule | None = None, seed: int = 0) -> None:
        super().__init__(net, cfg or FFDTPRule(), seed)
        self.net: DeepMLP = net
        self.inverses = self.build(
            lambda: nn.ModuleList(make_block(net.cfg) for _ in range(net.cfg.depth)))
        self.opt = torch.optim.Adam(self.inverses.parameters(), lr=self.cfg.inverse_lr)

    def calibrate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Pre-train the inverses and check the top/bottom target-norm ratio is in [0.1, 10]."""
        res = calibrate_dtp(self, x, y, steps=max(self.cfg.pretrain_steps, 1), batch_size=128)
        if not 0.1 <= res["target_ratio"] <= 10:
            raise ValueError(f"calibration: DTP top/bottom target-norm ratio "
                             f"{res['target_ratio']:.3g} after inverse pre-training is outside "
                             f"[0.1, 10]; raise rules.<row>.pretrain_steps or inverse_lr")
        return res

    def pretrain(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Pre-train this run's inverses on its own net, as calibrate measured."""
        if self.cfg.pretrain_steps > 0:
            calibrate_dtp(self, x, y, steps=self.cfg.pretrain_steps, batch_size=128)
        return {}

    def aux(self) -> dict[str, object]:
        return {"inverses": self.inverses, "opt": self.opt}

    def train_inverses(self, hs: list[Tensor]) -> float:
        """One step of difference reconstruction on every inverse; returns the mean loss."""
        sigma = self.cfg.noise_std
        total = hs[0].new_zeros(())
        with torch.enable_grad():
            for i, g in enumerate(self.inverses):
                h = hs[i].detach()
                n = sigma * self.randn(*h.shape)
                with torch.no_grad():
                    f_pert, f_clean = self.net.layer(i + 1, h + n), self.net.layer(i + 1, h)
                diff = g(f_pert) - g(f_clean) - n
                total = total + diff.pow(2).sum(-1).mean() / sigma**2
            self.opt.zero_grad(set_to_none=False)
            total.backward()
        self.opt.step()
        return float(total.detach()) / max(len(self.inverses), 1)

    @torch.no_grad()
    def targets(self, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        """[tau_0, ..., tau_L] by the difference formula."""
        b = hs[-1].shape[0]
        _, g_out = self.net.output_grad(hs[-1], y)
        taus = [hs[-1] - self.cfg.eta * b * g_out]
        for i in range(len(hs) - 2, -1, -1):
            g = self.inverses[i]
            taus.insert(0, hs[i] + g(taus[0]) - g(hs[i + 1]))
        return taus

    def credits_from(self, hs: list[Tensor], taus: list[Tensor]) -> list[Tensor]:
        b = hs[-1].shape[0]
        return [(h - t) / (self.cfg.eta * b) for h, t in zip(hs, taus, strict=True)]

    def learn(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        rec = 0.0
        for _ in range(self.cfg.inverse_steps):
            rec = self.train_inverses(hs)
        return {"term/inverse_rec": rec}

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        taus = self.targets(hs, y)
        loss = apply_credit(self.net, x, hs, self.credits_from(hs, taus), y)
        names = self.net.layer_names()
        stats = {"loss": float(loss)}
        for n, h, t in zip(names, hs, taus, strict=True):
            stats[f"target/{n}"] = float((t - h).norm(dim=-1).mean())
        return {**stats, **grad_norms(self.net), **act_rms(names, hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.credits_from(hs, self.targets(hs, y))


def target_norm_ratio(rule: DTP, x: Tensor, y: Tensor) -> float:
    """||tau_L - h_L|| / ||tau_0 - h_0|| (batch means of per-sample norms)."""
    with torch.no_grad():
        hs = rule.net.states(x)
        taus = rule.targets(hs, y)
        top = (taus[-1] - hs[-1]).norm(dim=-1).mean()
        bottom = (taus[0] - hs[0]).norm(dim=-1).mean()
    return float(top / (bottom + 1e-12))


def calibrate_dtp(rule: DTP, x: Tensor, y: Tensor, steps: int = 200,
                  batch_size: int = 128) -> dict[str, float]:
    """Pre-train the inverses for ``steps`` minibatches of x (rule RNG picks the batches)."""
    ratio0 = target_norm_ratio(rule, x[:batch_size], y[:batch_size])
    rec0 = rec = float("nan")
    for i in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=rule.gen)
        with torch.no_grad():
            hs = rule.net.states(x[idx.to(x.device)])
        rec = rule.train_inverses(hs)
        if i == 0:
            rec0 = rec
    return {"inverse_rec_start": rec0, "inverse_rec_end": rec,
            "target_ratio_start": ratio0,
            "target_ratio": target_norm_ratio(rule, x[:batch_size], y[:batch_size])}
