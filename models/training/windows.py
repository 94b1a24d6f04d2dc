"""Random token windows as a batch source (``models.training.batches``): the language-model
studies' training and evaluation batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.data.tokens import TokenStream


class Windows:
    """Random token windows (``TokenStream``) on ``device``: (x, y) with y the shifted window, or
    with ``last_only`` the one token after each window (next-token prediction from a context)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device, last_only: bool = False) -> None:
        self.stream = TokenStream(tokens, block_size, batch_size, seed)
        self.device = device
        self.last_only = last_only

    def next(self, step: int = 0) -> tuple[Tensor, Tensor]:
        x, y = self.stream.next_batch(self.device)
        return (x, y[:, -1]) if self.last_only else (x, y)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
