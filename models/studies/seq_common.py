"""What the sequence-model studies (``pc_seq``, ``dtp_wm``) share: the token corpus and the
references every row must beat (ln V, unigram, untrained net)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models import io
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
