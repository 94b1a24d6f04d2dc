"""What the sequence-model studies (``pc_seq``, ``dtp_wm``) share: the token corpus, the
references every row must beat (ln V, unigram, untrained net) and a layer-wise LR gain."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from models import io
from models.config.seq import LayerRateConfig
from models.data.tokens import read_tokens
from models.pipeline import tokens_dir
from models.studies import baselines

EVAL_SEED = 10_000  # the same validation windows for every row and seed


def vocab_size() -> int:
    return int(io.read_json(tokens_dir() / "meta.json")["vocab_size"])


def train_tokens() -> np.ndarray:
    return read_tokens(tokens_dir() / "train.bin")


def val_tokens() -> np.ndarray:
    return read_tokens(tokens_dir() / "val.bin")


def lm_health(init_loss: float) -> dict[str, Any]:
    """``calibration.json["health"]``: ln V chance, the unigram and the untrained net."""
    return baselines.language_model(train_tokens(), val_tokens(), vocab_size(), init_loss)


def check_init_loss(init_loss: float, study: str) -> None:
    ln_v = math.log(vocab_size())
    if abs(init_loss / ln_v - 1) > 0.1:
        raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                         f"ln V = {ln_v:.3f}; the initialisation of studies.{study} is off")


class LayerRates:
    """Per-layer LR gains (log 001: faster layers slowed, slower ones sped up, within a range):
    gain_l <- clip(gain_l * (median_k rate_k / rate_l)^power, lo, hi) with rate_l an EMA of the
    layer's relative update |dtheta_l| / |theta_l|. State: gains and rates (checkpointed)."""

    def __init__(self, n: int, cfg: LayerRateConfig | None) -> None:
        self.cfg = cfg
        self.gains = torch.ones(n, dtype=torch.float64)
        self.rates = torch.zeros(n, dtype=torch.float64)
        self.seen = False

    def update(self, rel_updates: list[float]) -> None:
        if self.cfg is None or self.cfg.power == 0:
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
