"""Exponential moving average of weights (off when decay is 0); part of the checkpoint."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval() if decay > 0 else None
        if self.shadow is not None:
            self.shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.shadow is None:
            return
        for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - self.decay)

    def averaged(self, model: nn.Module) -> nn.Module:
        """The model to evaluate: the EMA copy when enabled, else the model itself."""
        return self.shadow if self.shadow is not None else model

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow.state_dict() if self.shadow is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.shadow is not None:
            self.shadow.load_state_dict(state["shadow"])
