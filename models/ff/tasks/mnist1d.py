"""MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package: never downloaded.

``mnist1d.data.make_dataset`` with ``get_dataset_args()`` defaults (5000 samples, seed 42,
train_split 0.8) gives the standard 4000/1000 split of length-40 signals. The package seeds the
*global* numpy/random RNGs, so their states are saved and restored around the call.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from models.ff.tasks import Split


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Split(torch.as_tensor(d["x"], dtype=torch.float32),
                 torch.as_tensor(d["y"], dtype=torch.int64),
                 torch.as_tensor(d["x_test"], dtype=torch.float32),
                 torch.as_tensor(d["y_test"], dtype=torch.int64))
