"""Per-layer LR gains (log 001: faster layers slowed, slower ones sped up, within a range).

gain_l <- clip(gain_l * (median_k rate_k / rate_l)^power, lo, hi), with rate_l an EMA of the
layer's relative update |dtheta_l| / |theta_l|. The trainer applies the gains to its LR and feeds
them the relative updates it measures; gains and rates are part of its checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from models.config.seq import LayerRateConfig


class LayerRates:
    def __init__(self, n: int, cfg: LayerRateConfig) -> None:
        self.cfg = cfg
        self.gains = torch.ones(n, dtype=torch.float64)
        self.rates = torch.zeros(n, dtype=torch.float64)
        self.seen = False

    def update(self, rel_updates: list[float]) -> None:
        if self.cfg.power == 0:
            return
        r = torch.tensor(rel_updates, dtype=torch.float64).clamp_min(1e-12)
        self.rates = r if not self.seen else self.cfg.ema * self.rates + (1 - self.cfg.ema) * r
        self.seen = True
        ratio = self.rates.median() / self.rates
        self.gains = (self.gains * ratio.pow(self.cfg.power)).clamp(self.cfg.lo, self.cfg.hi)

    def state_dict(self) -> dict[str, Any]:
        return {"gains": self.gains.clone(), "rates": self.rates.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gains, self.rates = state["gains"].clone(), state["rates"].clone()
        self.seen = bool(state["seen"])
