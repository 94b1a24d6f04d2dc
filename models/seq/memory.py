"""Peak working memory of a block of torch code, on any device, deterministic.

CPU torch has no allocator statistics and ``tracemalloc`` does not see torch's allocations, so
the meter counts tensor storages itself: a ``TorchDispatchMode`` sees every tensor an op
allocates (below autograd, so tensors saved for backward are included) and a weakref finalizer
sees each one released. Storages are keyed by data pointer and reference-counted over the tensor
objects that share them (views, in-place results). Tensors that exist before the block (weights,
inputs) are not counted: the number is what the step itself needs on top of the model, which is
what differs between a PC training step, a settling-only step and backprop through settling.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak`` (bytes) and ``m.peak_mb``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensor objects alive]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.live[key]

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
