"""Tasks for the feed-forward rule studies (MNIST-1D, nonlinearity ladder, toy LQ, CIFAR-10)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Split:
    """Train/test tensors of one task (inputs float32, labels int64 or regression targets)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
