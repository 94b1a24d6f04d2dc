"""What every row of the ``eqt_lm`` study shares: the validation windows every row and seed are
scored on, and the checks and baselines of a language model's calibration (the token data comes
from the run's ``RunContext``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.config import TrainConfig
from models.context import TokenCorpus
from models.studies import baselines
from models.training.windows import Windows

EVAL_SEED = 10_000  # the same validation windows for every row and seed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def val_loss(loss: LossFn, val: np.ndarray, block_size: int, cfg: TrainConfig, batches: int,
             device: torch.device) -> float:
    """Mean held-out CE on the validation windows (of the tokens ``val``) every row and seed
    share."""
    windows = Windows(val, block_size, cfg.batch_size, EVAL_SEED, device)
    return float(np.mean([float(loss(*windows.next())) for _ in range(batches)]))


def lm_baselines(corpus: TokenCorpus, init_loss: float) -> dict[str, Any]:
    """What every row must beat (models.studies.baselines): ln V, the n-gram counts, the
    untrained net."""
    return baselines.language_model(corpus.train, corpus.val, corpus.vocab_size, init_loss)


def check_init_loss(init_loss: float, ln_v: float) -> None:
    if abs(init_loss / ln_v - 1) > 0.1:
        raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                         f"ln V = {ln_v:.3f}; the initialisation is off")


