"""Nonlinearity ladder (log 002): teacher-student classification with phi_a.

Teacher: a random DeepMLP of the student family (input projection, ``depth`` pre-LN residual
one-layer blocks h <- h + phi_a(W LN(h)), head), width d = 128, 10 classes, weights N(0,
gain^2 / fan_in) (gain = 2 keeps tanh in its nonlinear range). Inputs x ~ N(0, I_d); label =
argmax of the teacher logits after subtracting their mean over the generated set (balances the
classes). Everything is drawn from a private generator seeded by ``seed``: same seed, same data.
The student for a ladder cell is ``student_config(a, depth)``.
"""

from __future__ import annotations

import torch

from models.ff.mlp import DeepMLP, MLPConfig
from models.ff.tasks import Split

ALPHAS = (0.0, 0.25, 0.5, 1.0)
DEPTHS = (2, 4, 8, 12)


def student_config(a: float, depth: int, d: int = 128, n_classes: int = 10) -> MLPConfig:
    return MLPConfig(d_in=d, d_out=n_classes, width=d, depth=depth, block_layers=1, act="phi",
                     phi_a=a)


def make_ladder(a: float, depth: int, *, d: int = 128, n_classes: int = 10, n_train: int = 10000,
                n_test: int = 2000, seed: int = 0, gain: float = 2.0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        teacher = DeepMLP(student_config(a, depth, d, n_classes)).double()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(gain * torch.randn(m.weight.shape, generator=gen,
                                                  dtype=torch.float64) / m.in_features**0.5)
                m.bias.zero_()
        x = torch.randn(n_train + n_test, d, generator=gen, dtype=torch.float64)
        logits = teacher(x)
        y = (logits - logits.mean(0)).argmax(-1)
    x = x.float()
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
