"""The latent bridge: source hidden states -> K soft tokens in the target's embedding space
(METHODS §4; log 004's StatisticalNormalizer + PerceiverResampler + output scaling).

    h_src [B, T, C_s] --normalise--> --resample (K queries, cross-attention)--> [B, K, C_t]
        --output map (none | tanh x scale | RMS x scale | FSQ)--> soft tokens s

- ``Normalizer``: the calibration's per-dimension statistics. The source is whitened with its
  own mean/std; the resampler's output is recoloured with the target embeddings' mean/std, so an
  untrained bridge already emits vectors at the target's scale (log 004 maps Llama's
  statistics onto Mistral's in one affine map; here the widths differ, so the two halves sit on
  either side of the resampler). ``learnable`` makes the four statistics parameters (log 004 V3+).
- ``Resampler``: K learned queries; each layer is pre-LN cross-attention to the source sequence
  (padding masked), self-attention among the queries and an FFN, all residual; a final LN (the
  output std ~1 that log 004 V6 fed to Mistral at ~33x its embedding scale).
- ``OutputMap``: ``none`` (V1/V2/V6), ``tanh``: tanh(x) * scale (V3/V7, scale learnable from
  ``init_scale``), ``rms``: x / RMS(x) * scale (V15h), ``fsq``: finite scalar quantisation of a
  low-dimensional projection with a straight-through gradient (V15d/e), projected back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OutputKind = Literal["none", "tanh", "rms", "fsq"]


@dataclass(frozen=True)
class BridgeShape:
    """The bridge's shape; ``fsq_levels`` only for ``output == "fsq"``."""

    src_dim: int
    tgt_dim: int
    k: int = 16
    depth: int = 2
    n_head: int = 4
    output: OutputKind = "none"
    init_scale: float = 1.0  # the output scale's start (tanh / rms), relative to the target RMS
    learnable_norm: bool = False
    fsq_levels: tuple[int, ...] = (5, 5, 5, 5)


class Normalizer(nn.Module):
    """Whitens the source with its calibrated per-dimension mean/std; recolours an output with
    the target embeddings' mean/std."""

    def __init__(self, src_mean: Tensor, src_std: Tensor, tgt_mean: Tensor, tgt_std: Tensor,
                 learnable: bool) -> None:
        super().__init__()
        for name, value in (("src_mean", src_mean), ("src_std", src_std),
                            ("tgt_mean", tgt_mean), ("tgt_std", tgt_std)):
            value = value.detach().clone().float()
            if learnable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def whiten(self, h: Tensor) -> Tensor:
        return (h - self.src_mean) / self.src_std.clamp_min(1e-6)

    def recolour(self, x: Tensor) -> Tensor:
        return x * self.tgt_std + self.tgt_mean


class _Layer(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_s, self.ln_f = (nn.LayerNorm(dim) for _ in range(4))
        self.cross = nn.MultiheadAttention(dim, n_head, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, n_head, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: Tensor, src: Tensor, pad: Tensor | None) -> Tensor:
        kv = self.ln_kv(src)
        q = q + self.cross(self.ln_q(q), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        s = self.ln_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.ffn(self.ln_f(q))


class Resampler(nn.Module):
    """K learned queries attending to the (projected) source sequence, ``depth`` layers."""

    def __init__(self, src_dim: int, dim: int, k: int, depth: int, n_head: int) -> None:
        super().__init__()
        self.proj = nn.Linear(src_dim, dim)
        self.queries = nn.Parameter(torch.randn(k, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList(_Layer(dim, n_head) for _ in range(depth))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pad: Tensor | None = None) -> Tensor:
        kv = self.proj(src)
        q = self.queries.expand(src.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv, pad)
        return self.ln_out(q)


def fsq(z: Tensor, levels: Tensor) -> Tensor:
    """Finite scalar quantisation (Mentzer et al. 2023): bound each dimension with tanh to
    (L - 1) / 2, round to the nearest level, straight-through gradient. Odd L only (the grid is
    symmetric around 0)."""
    half = (levels - 1) / 2
    bounded = torch.tanh(z) * half
    return bounded + (torch.round(bounded) - bounded).detach()


class Bridge(nn.Module):
    """Source hidden states [B, T, C_s] (+ padding mask) -> soft tokens [B, K, C_t]."""

    def __init__(self, shape: BridgeShape, stats: dict[str, Tensor]) -> None:
        super().__init__()
        if shape.output == "fsq" and any(level % 2 == 0 for level in shape.fsq_levels):
            raise ValueError(f"fsq_levels must be odd (got {shape.fsq_levels})")
        self.shape = shape
        self.norm = Normalizer(stats["src_mean"], stats["src_std"], stats["tgt_mean"],
                               stats["tgt_std"], shape.learnable_norm)
        self.resampler = Resampler(shape.src_dim, shape.tgt_dim, shape.k, shape.depth,
                                   shape.n_head)
        self.tgt_rms = float(stats["tgt_rms"])
        self.log_scale = nn.Parameter(torch.tensor(math.log(shape.init_scale)))
        if shape.output == "fsq":
            self.register_buffer("levels", torch.tensor(shape.fsq_levels, dtype=torch.float))
            self.down = nn.Linear(shape.tgt_dim, len(shape.fsq_levels))
            self.up = nn.Linear(len(shape.fsq_levels), shape.tgt_dim)

    def pre_output(self, h_src: Tensor, pad: Tensor | None = None) -> Tensor:
        """The resampler's output before the output map (what tanh saturation is read on)."""
        return self.resampler(self.norm.whiten(h_src), pad)

    def codes(self, x: Tensor) -> Tensor:
        """FSQ code indices [B, K] of a pre-output (for codebook usage)."""
        q = torch.round(torch.tanh(self.down(x)) * (self.levels - 1) / 2) + (self.levels - 1) / 2
        base = torch.cumprod(torch.cat([torch.ones(1, device=x.device), self.levels[:-1]]), 0)
        return (q * base).sum(-1).long()

    def output_map(self, x: Tensor) -> Tensor:
        kind = self.shape.output
        scale = self.log_scale.exp() * self.tgt_rms
        if kind == "none":
            return self.norm.recolour(x)
        if kind == "tanh":
            return torch.tanh(x) * scale
        if kind == "rms":
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt() * scale
        return self.norm.recolour(self.up(fsq(self.down(x), self.levels)))

    def forward(self, h_src: Tensor, pad: Tensor | None = None) -> Tensor:
        return self.output_map(self.pre_output(h_src, pad))


def soft_prompt_loss(target: nn.Module, soft: Tensor, suffix: Tensor, labels: Tensor) -> Tensor:
    """The frozen target's LM loss of predicting the suffix ids [B, M] (primer + answer) after
    the soft tokens [B, K, C]: the logits at positions K-1 .. K+M-2 score ``labels`` [B, M], the
    suffix ids with -100 where not scored (the primer, padding). Its gradient reaches the
    bridge through ``soft`` only when the target is frozen."""
    emb = torch.cat([soft, target.tok(suffix)], dim=1)
    logits = target.forward_embeddings(emb)[:, soft.shape[1] - 1:-1]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
