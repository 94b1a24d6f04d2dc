"""The protocol every feed-forward learning rule implements, and the state helpers they share.

A rule owns everything beyond the net's own weights: fixed feedback matrices, learned auxiliary
modules (DTP inverses, bridges, value nets, PC precisions) with their internal optimizer, its RNG
and an epoch counter. The contract has three calls:

- ``learn(x, y)``: train the rule's own estimators on a batch (no net gradients). The LQ toy calls
  only this: the system stays fixed while the estimators learn.
- ``grads(x, y)``: write the rule's weight update into ``p.grad`` of the net and nothing else (no
  estimator step), so the credit metrics see the update the rule would make on held-out data.
- ``update(x, y)``: one training step of a co-trained net, ``learn`` then ``grads`` by default;
  the pipeline's optimizer then steps the net.

and the optional calls a rule overrides where it needs them (per-rule behaviour lives in the rule,
never in ``kind ==`` branches of a study): ``from_config`` (construction from the row's config and
the run's seed and epochs), ``calibrate`` (measure before training, a dict for the calibration
file), ``apply_calibration`` (use it in a run) and ``pretrain`` (work at step 0 of each run).

A rule is one module ``models/ff/rules/<kind>.py`` whose ``Rule`` subclass has ``name = <kind>``;
``models.ff.rules.build`` finds it by its kind, so adding a rule edits no other code file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Rule(ABC):
    name: ClassVar[str]

    def __init__(self, net: nn.Module, cfg: Any, seed: int = 0) -> None:
        """``cfg``: the rule's class from models.config.ff; ``seed``: the run's seed."""
        self.net = net
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(seed)

    @classmethod
    def from_config(cls, net: nn.Module, cfg: Any, seed: int, epochs: int) -> Rule:
        """The rule of a row: ``cfg`` its config, ``seed`` the run's, ``epochs`` the run's."""
        return cls(net, cfg, seed)

    def calibrate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """What the rule measures on fit examples before training (none by default)."""
        return {}

    def apply_calibration(self, cal: dict[str, Any]) -> None:
        """Use what ``calibrate`` measured (nothing by default)."""
        return None

    def pretrain(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Work at step 0 of a run on the fit split ``(x, y)`` (nothing by default)."""
        return {}

    def learn(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Train the rule's estimators on (x, y); return their statistics. None by default."""
        return {}

    @abstractmethod
    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Write the weight update into ``p.grad`` (no side effects otherwise); statistics."""

    def update(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One training step's rule work: estimators first, then the weight update."""
        return {**self.learn(x, y), **self.grads(x, y)}

    @abstractmethod
    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """The rule's stand-in for dL/dh_l, one tensor per hidden state (no side effects)."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at the start of each epoch (warm-ups, annealing)."""
        self.epoch = epoch

    # --- state -----------------------------------------------------------------------------
    def aux(self) -> dict[str, Any]:
        """Rule-owned objects with their own ``state_dict`` (modules, optimizers)."""
        return {}

    def buffers(self) -> dict[str, Tensor]:
        """Rule-owned plain tensors (fixed feedback matrices, EMAs)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "gen": self.gen.get_state(),
            "aux": {k: v.state_dict() for k, v in self.aux().items()},
            "buffers": {k: v.detach().clone() for k, v in self.buffers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        for k, v in self.aux().items():
            v.load_state_dict(state["aux"][k])
        for k, buf in self.buffers().items():
            buf.copy_(state["buffers"][k])

    # --- helpers ---------------------------------------------------------------------------
    def randn(self, *shape: int) -> Tensor:
        """Rule-RNG normal sample (CPU generator, so CUDA runs reproduce and checkpoint too)."""
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype).to(self.device)

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Create an auxiliary module from the rule's seed without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 7919)
            module = factory()
        return module.to(device=self.device, dtype=self.dtype)


def flat_grad_norm(params: list[nn.Parameter]) -> float:
    return sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None) ** 0.5
