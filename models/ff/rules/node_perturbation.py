"""Node perturbation (Williams 1992; Fiete & Seung 2006): credit for h_l from the change of the
loss under a random perturbation of h_l, no backward pass at all.

For each hidden state h_l and each example b, draw eps_b ~ N(0, I) and run the rest of the net
forward from h_l + sigma eps and from h_l - sigma eps. The central difference of example b's loss

    d_b = (l_b(h_l + sigma eps) - l_b(h_l - sigma eps)) / (2 sigma)  =  grad_{h_lb} l_b . eps_b + O(sigma^2)

gives the credit c_lb = d_b eps_b / B (the loss is the batch mean), whose expectation over eps is
dL/dh_lb: an unbiased estimate of BP's credit with variance growing with the width. The weight
update is then the local one every credit rule uses (``models.ff.mlp.apply_credit``). Perturbing
one example's state changes that example's loss only, so one pair of forward passes per layer
serves the whole batch. The perturbations come from the rule's own generator (checkpointed).

This module is also the README's worked example of adding a rule: the rule (this file), its config
class (``models/config/ff_rules/node_perturbation.py``) and a params row; nothing else changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config.ff_rules.node_perturbation import FFNodePerturbationRule
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms
from models.ff.rules.base import Rule


class NodePerturbation(Rule):
    name = "node_perturbation"

    def __init__(self, net: DeepMLP, cfg: FFNodePerturbationRule | None = None,
                 seed: int = 0) -> None:
        super().__init__(net, cfg or FFNodePerturbationRule(), seed)
        self.net: DeepMLP = net

    def loss_after(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        """Per-example loss when h_layer is replaced by ``h`` and the rest runs forward."""
        for blk in self.net.blocks[layer:]:
            h = blk(h)
        return self.net.per_sample_loss(self.net.readout(h), y)

    @torch.no_grad()
    def credits_from(self, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        """[c_0, ..., c_L], c_l = mean over directions of d_b eps_b / B (module docstring)."""
        sigma, k = self.cfg.sigma, self.cfg.directions
        out = []
        for layer, h in enumerate(hs):
            c = torch.zeros_like(h)
            for _ in range(k):
                eps = self.randn(*h.shape)
                d = (self.loss_after(layer, h + sigma * eps, y)
                     - self.loss_after(layer, h - sigma * eps, y)) / (2 * sigma)
                c += d[:, None] * eps
            out.append(c / (k * h.shape[0]))
        return out

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        loss = apply_credit(self.net, x, hs, self.credits_from(hs, y), y)
        return {"loss": float(loss), **grad_norms(self.net), **act_rms(self.net.layer_names(), hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.credits_from(hs, y)
