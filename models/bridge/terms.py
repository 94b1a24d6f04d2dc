"""The bridge's loss terms, each a small pure function of tensors (log 004's variants are
weighted sums of these; ``models.bridge.step`` adds them up).

Shapes: soft tokens ``s`` [B, K, C_t]; source states ``h`` [B, T, C_s] with padding mask
``pad`` [B, T] (True = padding); target embeddings of a text ``e`` [B, T', C_t] with ``e_pad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, pad: Tensor | None) -> Tensor:
    """Mean over the sequence axis of [B, T, C], padding excluded."""
    if pad is None:
        return x.mean(1)
    keep = (~pad).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - mean over the batch of cos(a_i, b_i), for [B, C] vectors."""
    return 1 - F.cosine_similarity(a, b, dim=-1).mean()


def recon_cos(s_in_src: Tensor, h: Tensor, pad: Tensor | None) -> Tensor:
    """V1: the mean-pooled soft tokens (mapped back to the source space by the caller's head)
    against the mean-pooled source states, cosine distance."""
    return cosine_distance(s_in_src.mean(1), masked_mean(h, pad))


def info_nce(s: Tensor, temperature: float = 0.07) -> Tensor:
    """V2: cross-entropy over the [B, B] cosine matrix of the mean-pooled soft tokens with the
    diagonal as positives (log 004's form: it pushes different inputs' soft tokens apart, which
    is uniformity, not alignment with anything the target reads)."""
    z = F.normalize(s.mean(1), dim=-1)
    logits = z @ z.T / temperature
    return F.cross_entropy(logits, torch.arange(len(z), device=z.device))


def anchor_cos(s: Tensor, e: Tensor, e_pad: Tensor | None) -> Tensor:
    """V3.1/V7: cosine distance of the mean-pooled soft tokens to the mean of the answer's
    target embeddings (scale-free)."""
    return cosine_distance(s.mean(1), masked_mean(e, e_pad))


def anchor_mse(s: Tensor, e: Tensor, e_pad: Tensor | None) -> Tensor:
    """V3: MSE of the same means (scale-dependent: at log 004's 10x scale mismatch it read
    0.0000 from the first step)."""
    return F.mse_loss(s.mean(1), masked_mean(e, e_pad))


def batch_similarity_loss(s: Tensor) -> Tensor:
    """V15h: the mean off-diagonal cosine between the flattened soft tokens of the batch
    (differentiable; ``models.bridge.metrics.batch_similarity`` is its measured value)."""
    z = F.normalize(s.flatten(1), dim=-1)
    sim = z @ z.T
    b = len(z)
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def unique_ratio_loss(codes: Tensor) -> Tensor:
    """V15f's diversity term as the log wrote it: -log of the unique-code ratio, computed with
    ``torch.unique`` and rewrapped as a fresh tensor. It has no gradient path to the bridge
    (kept to reproduce that failure; the ``no_gradient_path`` health check flags it)."""
    ratio = float(torch.unique(codes).numel()) / codes.numel()
    return torch.tensor(-torch.log(torch.tensor(ratio + 1e-8)).item(), device=codes.device)
