"""``EquilibriumLM``: embeddings + one equilibrium block + linear head (the rules that train it
live in their own modules; ``models.eqt.step`` is one training step of any of them).

Readout: logits = z* W_h with no final LayerNorm, as in log 003 (eq. thick and ONBOARDING §2:
"readout logits = z*.W_h"). A final LN would make the loss depend on z only through LN(z) and
add a second, non-local normalisation to the nudge; the log's block keeps the readout linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.eqt.block import ConservativeBlock, ThickBlock
from models.eqt.relax import RelaxConfig, RelaxResult, relax


@dataclass(frozen=True)
class EqShape:
    """Shape and initialisation of an ``EquilibriumLM``.

    ``emb_std`` = 1 keeps |z*| of order one: LN sits inside F and its Jacobian scales like
    1/sigma(z), so tiny embeddings would inflate J (log 003, "a subtlety for LN-inside blocks").
    ``resinit`` scales the init of the two branch output projections (attn.o, ffn.proj), the
    log's ``--resinit`` knob.
    """

    vocab_size: int
    block_size: int
    n_embd: int = 64
    n_head: int = 4
    qk_norm: bool = False
    damping: float = 1.0
    block: Literal["thick", "conservative"] = "thick"
    emb_std: float = 1.0
    init_std: float = 0.02
    resinit: float = 1.0


class EquilibriumLM(nn.Module):
    """Language model whose hidden state is the fixed point of ``block`` (METHODS §2)."""

    def __init__(self, shape: EqShape, relax_cfg: RelaxConfig | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.relax_cfg = relax_cfg or RelaxConfig()
        self.tok = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.pos = nn.Embedding(shape.block_size, shape.n_embd)
        self.block: ThickBlock | ConservativeBlock
        if shape.block == "thick":
            self.block = ThickBlock(shape.n_embd, shape.n_head, shape.qk_norm, shape.damping)
        else:
            self.block = ConservativeBlock(shape.n_embd, shape.n_head, shape.damping)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.startswith(("tok.", "pos.")):
                nn.init.normal_(p, std=shape.emb_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                scale = shape.resinit if name.endswith(("attn.o.weight", "ffn.proj.weight")) else 1
                nn.init.normal_(p, std=shape.init_std * scale)

    def x_in(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.shape.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.shape.block_size}")
        return self.tok(idx) + self.pos(torch.arange(t, device=idx.device))

    def force(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return self.block(z, x_in)

    def ce(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss l(z): mean next-token cross-entropy of the linear readout."""
        return F.cross_entropy(self.head(z).flatten(0, 1), targets.flatten())

    def ce_grad_z(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """dl/dz in closed form, (softmax(z W_h) - onehot) W_h / (B T); valid for complex z
        (softmax as a ratio of exponentials), which holomorphic EP needs."""
        w = self.head.weight.to(z.dtype)
        logits = z @ w.T
        e = torch.exp(logits - logits.real.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        p = p - F.one_hot(targets, self.shape.vocab_size).to(z.dtype)
        return (p @ w) / targets.numel()

    def free_phase(self, idx: torch.Tensor, differentiable: bool = False,
                   relax_cfg: RelaxConfig | None = None) -> RelaxResult:
        """Relax from x_in under ``relax_cfg`` (default: the model's own)."""
        x_in = self.x_in(idx)
        x_f = x_in if differentiable else x_in.detach()
        return relax(lambda z: self.force(z, x_f), x_f, relax_cfg or self.relax_cfg,
                     differentiable)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at the free-phase fixed point (no autograd through the relaxation)."""
        return self.head(self.free_phase(idx).z)

    @torch.no_grad()
    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Evaluation CE via the free phase; non-finite states give +inf, never a stale value."""
        z = self.free_phase(idx).z
        if not torch.isfinite(z).all():
            return torch.tensor(math.inf, device=idx.device)
        return self.ce(z, targets)
