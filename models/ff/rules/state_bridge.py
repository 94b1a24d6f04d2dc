"""State bridge (log 002): learned maps S_l(h_l) ~ h_L; credit_l = J_{S_l}(h_l)^T dL/dh_L.

S_l has the forward block's architecture (h + f(LN(h)), near the identity at init, as h_L is
h_l plus the remaining residual branches). Trained by normalised MSE (log 002 commit 0b9ebb2):
sum ||S_l(h_l) - h_L||^2 / (sum ||h_L||^2 + 1e-8) over the batch. dL/dh_L is taken through the
head only (output-local); the top state h_L uses it directly (S_L is the identity).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config.ff_rules.state_bridge import FFStateBridgeRule
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms, make_block
from models.ff.rules.base import Rule


class StateBridge(Rule):
    name = "state_bridge"

    def __init__(self, net: DeepMLP, cfg: FFStateBridgeRule | None = None,
                 seed: int = 0) -> None:
        super().__init__(net, cfg or FFStateBridgeRule(), seed)
        self.net: DeepMLP = net
        self.bridges = self.build(
            lambda: nn.ModuleList(make_block(net.cfg) for _ in range(net.cfg.depth)))
        self.opt = torch.optim.Adam(self.bridges.parameters(), lr=self.cfg.bridge_lr)

    def aux(self) -> dict[str, object]:
        return {"bridges": self.bridges, "opt": self.opt}

    def train_bridges(self, hs: list[Tensor]) -> float:
        top = hs[-1].detach()
        norm = top.pow(2).sum() + 1e-8
        with torch.enable_grad():
            losses = [(s(h.detach()) - top).pow(2).sum() / norm
                      for s, h in zip(self.bridges, hs[:-1], strict=False)]
            total = sum(losses, top.new_zeros(()))
            self.opt.zero_grad(set_to_none=False)
            total.backward()
        self.opt.step()
        return float(total.detach()) / max(len(losses), 1)

    def credits_from(self, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        _, g_top = self.net.output_grad(hs[-1], y)
        out = []
        with torch.enable_grad():
            for s, h in zip(self.bridges, hs[:-1], strict=False):
                hh = h.detach().requires_grad_(True)
                (c,) = torch.autograd.grad(s(hh), hh, grad_outputs=g_top)
                out.append(c)
        return [*out, g_top]

    def learn(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        return {"term/state_bridge": self.train_bridges(hs)}

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        loss = apply_credit(self.net, x, hs, self.credits_from(hs, y), y)
        return {"loss": float(loss), **grad_norms(self.net),
                **act_rms(self.net.layer_names(), hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.credits_from(hs, y)
