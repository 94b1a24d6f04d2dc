"""Back-propagation: the reference rule (autograd through the whole net)."""

from __future__ import annotations

from torch import Tensor

from models.config.ff_rules.bp import FFBPRule
from models.ff.mlp import DeepMLP, act_rms, grad_norms, true_state_grads
from models.ff.rules.base import Rule


class BP(Rule):
    name = "bp"

    def __init__(self, net: DeepMLP, cfg: FFBPRule | None = None, seed: int = 0) -> None:
        super().__init__(net, cfg or FFBPRule(), seed)
        self.net: DeepMLP = net

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        self.net.zero_grad(set_to_none=False)
        hs = self.net.states(x)
        loss = self.net.loss(self.net.readout(hs[-1]), y)
        loss.backward()
        names = self.net.layer_names()
        return {"loss": float(loss.detach()), **grad_norms(self.net), **act_rms(names, hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return true_state_grads(self.net, x, y)[1]
