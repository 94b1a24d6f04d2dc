"""Pre-LN causal transformer pieces, shared by the BP baseline and the equilibrium block.

Attention is written out (scores -> masked softmax -> weighted sum) instead of calling
``scaled_dot_product_attention`` so that forward-mode AD (``torch.func.jvp``) works on it: the
equilibrium-propagation rules need J v and J^T v of the same function that the BP baseline uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerShape:
    """Shape of a transformer language model (also the shape the equilibrium block matches)."""

    vocab_size: int
    block_size: int
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 1
    qk_norm: bool = False
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with untied Q, K, V, O and optional QK-norm."""

    def __init__(self, n_embd: int, n_head: int, qk_norm: bool = False) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd)
        self.k = nn.Linear(n_embd, n_embd)
        self.v = nn.Linear(n_embd, n_embd)
        self.o = nn.Linear(n_embd, n_embd)
        head = n_embd // n_head
        self.q_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.n_head

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, c // h).transpose(1, 2)

        q = self.q_norm(split(self.q(x)))
        k = self.k_norm(split(self.k(x)))
        v = split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Untied 4x GELU feed-forward network: W2 GELU(W1 x + b1) + b2."""

    def __init__(self, n_embd: int, mult: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, mult * n_embd)
        self.proj = nn.Linear(mult * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN residual block: h <- h + Attn(LN1 h); h <- h + FFN(LN2 h)."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.n_embd)
        self.attn = CausalSelfAttention(shape.n_embd, shape.n_head, shape.qk_norm)
        self.ln2 = nn.LayerNorm(shape.n_embd)
        self.ffn = FeedForward(shape.n_embd)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TransformerLM(nn.Module):
    """The BP baseline: token + position embeddings, n_layer pre-LN blocks, final LN, linear head."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.pos = nn.Embedding(shape.block_size, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        self.apply(_init_weights)

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after the embedding and after every block (for per-layer statistics)."""
        return self.embedded_states(self.tok(idx))

    def embedded_states(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """``hidden_states`` from token-level input vectors [B, T, C] instead of ids: the token
        embeddings, or vectors placed among them (the latent bridge's soft tokens)."""
        t = emb.shape[1]
        if t > self.shape.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.shape.block_size}")
        h = emb + self.pos(torch.arange(t, device=emb.device))
        states = [h]
        for block in self.blocks:
            h = block(h)
            states.append(h)
        return states

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.hidden_states(idx)[-1]))

    def forward_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits from input vectors [B, T, C] (``embedded_states``)."""
        return self.head(self.ln_f(self.embedded_states(emb)[-1]))


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style init (N(0, 0.02)), so the initial loss is close to ln V."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@contextmanager
def attention_off(model: nn.Module) -> Iterator[None]:
    """Inside the block, every ``CausalSelfAttention`` of ``model`` outputs zeros: what the model
    predicts from the current token (and its position) alone. For the equilibrium LM the fixed
    point is relaxed again without the attention branch. The gap to the full model's held-out CE
    is how much of it comes from context (``eqt_lm`` diagnose: ``context_gain``)."""
    handles = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
               for m in model.modules() if isinstance(m, CausalSelfAttention)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
