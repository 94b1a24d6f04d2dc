"""What the sequence-model studies (``pc_seq``, ``dtp_wm``) share: the references every row must
beat (ln V, the n-gram counts, the untrained net) on the run's token corpus (``RunContext``)."""

from __future__ import annotations

import math
from typing import Any

from models.context import TokenCorpus
from models.studies import baselines

EVAL_SEED = 10_000  # the same validation windows for every row and seed


def lm_health(corpus: TokenCorpus, init_loss: float) -> dict[str, Any]:
    """``calibration.json["health"]``: ln V chance, the n-gram models and the untrained net."""
    return baselines.language_model(corpus.train, corpus.val, corpus.vocab_size, init_loss)


def check_init_loss(init_loss: float, vocab_size: int, study: str) -> None:
    ln_v = math.log(vocab_size)
    if abs(init_loss / ln_v - 1) > 0.1:
        raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                         f"ln V = {ln_v:.3f}; the initialisation of studies.{study} is off")
