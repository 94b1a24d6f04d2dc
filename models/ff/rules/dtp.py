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

import torch
from torch import Tensor, nn

from models.config.ff import FFDTPRule
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
