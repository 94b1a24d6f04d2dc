"""Toy linear-quadratic credit problem with an exact costate (log 002 "toy LQ").

The student is a DeepMLP with ``lq_config``: no normalisation, identity nonlinearity, one-layer
blocks, MSE loss, i.e. a linear system

    h_0 = W_in x + b_in,   h_l = A_l h_{l-1} + b_l  with A_l = I + W_l  (l = 1..L),
    z = W_out h_L + b_out,   J = (1/B) sum_i 0.5 ||z_i - y_i||^2

Data: x ~ N(0, I_{d_in}), y = T x + noise with a fixed random teacher T (private generator).
The costate is the total derivative of J with respect to the state, obtained by the adjoint
recursion with the explicit matrices (no autograd):

    lambda_L = W_out^T (z - y) / B,   lambda_{l-1} = A_l^T lambda_l

(rows are samples, so in code lambda_{l-1} = lambda_l @ A_l). Rules' credits are compared to it
with ``metrics.costate_cosine``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.ff.mlp import DeepMLP, MLPConfig
from models.ff.tasks import Split


def lq_config(depth: int = 4, d: int = 32, d_in: int = 16, d_out: int = 8) -> MLPConfig:
    return MLPConfig(d_in=d_in, d_out=d_out, width=d, depth=depth, block_layers=1,
                     act="identity", layernorm=False, loss="mse")


def make_lq(d_in: int = 16, d_out: int = 8, *, n_train: int = 4096, n_test: int = 1024,
            noise: float = 0.1, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    x = torch.randn(n_train + n_test, d_in, generator=gen)
    y = x @ t.T + noise * torch.randn(n_train + n_test, d_out, generator=gen)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


@torch.no_grad()
def exact_costate(net: DeepMLP, x: Tensor, y: Tensor) -> list[Tensor]:
    """[lambda_0, ..., lambda_L] for a net built from ``lq_config``."""
    if net.cfg.act != "identity" or net.cfg.layernorm or net.cfg.block_layers != 1:
        raise ValueError("exact_costate needs a linear net (lq_config)")
    hs = net.states(x)
    z = net.head(hs[-1])
    lam = [(z - y) @ net.head.weight / x.shape[0]]
    eye = torch.eye(net.cfg.width, dtype=x.dtype, device=x.device)
    for blk in reversed(net.blocks):
        lam.insert(0, lam[0] @ (eye + blk.fc1.weight))
    return lam
