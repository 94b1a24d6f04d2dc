"""Batch sources: where a trainer's batches come from, and their position (checkpointed).

``next(step)`` gives the step's batch; ``state_dict`` is the data position (generator states, the
current permutation), so a resumed segment sees the batches an uninterrupted run would. Sources:
``Epochs`` here (shuffled passes over tensors), ``models.training.windows.Windows`` (random token
windows; a module of its own, so the feed-forward studies do not depend on the token code).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class Batches(Protocol):
    def next(self, step: int) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Epochs:
    """Whole passes over (x, y), each in a fresh permutation and drop-last, so an epoch is always
    ``len(x) // batch_size`` steps and ``step`` alone says where in it a batch lies; the
    permutation generator and the current permutation are the state."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.steps_per_epoch = max(1, len(x) // batch_size)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.arange(len(x))

    def next(self, step: int) -> tuple[Tensor, Tensor]:
        pos = step % self.steps_per_epoch
        if pos == 0:
            self.perm = torch.randperm(len(self.x), generator=self.gen)
        idx = self.perm[pos * self.batch_size:(pos + 1) * self.batch_size].to(self.x.device)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
