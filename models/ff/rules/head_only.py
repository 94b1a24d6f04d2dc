"""Head only: the baseline every rule must beat ("do the hidden layers matter?").

Hidden layers keep their initial weights and only the readout learns, from its output-local
gradient: on the pre-LN MLP the head reads LN_f(h_L) of the frozen random net (credit 0 for every
hidden state); on the energy net (EP's family) the head reads rho(s_N) of the frozen free phase.
Each rule's head-only baseline is this rule on that rule's own network family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config.ff_rules.head_only import FFHeadOnlyRule
from models.ff.energy import EnergyMLP
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms
from models.ff.rules.base import Rule


class HeadOnly(Rule):
    name = "head_only"

    def __init__(self, net: nn.Module, cfg: FFHeadOnlyRule | None = None, seed: int = 0) -> None:
        super().__init__(net, cfg or FFHeadOnlyRule(), seed)

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        net = self.net
        if isinstance(net, EnergyMLP):
            net.zero_grad(set_to_none=False)
            s = net.states(x)
            with torch.enable_grad():
                loss = net.loss(net.readout(s[-1]), y)
                loss.backward()
            return {"loss": float(loss.detach())}
        assert isinstance(net, DeepMLP)
        with torch.no_grad():
            hs = net.states(x)
        loss = apply_credit(net, x, hs, [torch.zeros_like(h) for h in hs], y)
        return {"loss": float(loss), **grad_norms(net), **act_rms(net.layer_names(), hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        if isinstance(self.net, EnergyMLP):
            return [torch.zeros(x.shape[0], d, dtype=x.dtype, device=x.device)
                    for d in self.net.cfg.hidden]
        with torch.no_grad():
            return [torch.zeros_like(h) for h in self.net.states(x)]
