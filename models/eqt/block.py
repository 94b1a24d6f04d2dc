"""The equilibrium block written as a force F(z) on the token state z in R^{B x T x C}.

``ThickBlock`` is log 003's non-conservative ``thick`` block (eq. thick)::

    F(z) = -(z - x_in) + Attn(LN1 z) + W2 GELU(W1 LN2 z + b1) + b2 - c z

It reuses ``CausalSelfAttention`` / ``FeedForward`` from the BP baseline so that the two rows
share one definition of attention. ``forward_complex`` is the holomorphic extension used by
holomorphic EP (complex LN without conjugate in the variance, softmax as a ratio of
exponentials, tanh-GELU), evaluated with the same parameters.

``ConservativeBlock`` is an energy-based block, F = -dE/dz, so its Jacobian is symmetric and
plain EP is exact without the AEP correction (the CET route of log 003, with LN inside).

Both expose ``interaction(z)``: the part of F whose Jacobian may be asymmetric. The clamp and the
damping have Jacobian -(1 + c) I, which is symmetric and cancels in J - J^T, so AEP and jacreg
only need the interaction part (log 003, "the symmetric parts cancel").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import grad

from models.eqt import equations as eq
from models.nets.transformer import CausalSelfAttention, FeedForward


def complex_layer_norm(x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
    """LayerNorm extended holomorphically: the variance is mean((x - mu)^2), no conjugate."""
    if isinstance(ln, nn.Identity):
        return x
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    y = d / torch.sqrt((d * d).mean(-1, keepdim=True) + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight.to(x.dtype) + ln.bias.to(x.dtype)
    return y


def complex_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    bias = None if lin.bias is None else lin.bias.to(x.dtype)
    return nn.functional.linear(x, lin.weight.to(x.dtype), bias)


def complex_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU, an entire function, so it extends to complex arguments as written."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def complex_attention(x: torch.Tensor, attn: CausalSelfAttention) -> torch.Tensor:
    """``CausalSelfAttention.forward`` for complex x; softmax = exp(s - m) / sum exp(s - m).

    The shift m is the row maximum of Re s; any shift cancels in the ratio, so the value is the
    holomorphic extension's value.
    """
    b, t, c = x.shape
    h = attn.n_head

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.view(b, t, h, c // h).transpose(1, 2)

    q = complex_layer_norm(split(complex_linear(x, attn.q)), attn.q_norm)
    k = complex_layer_norm(split(complex_linear(x, attn.k)), attn.k_norm)
    v = split(complex_linear(x, attn.v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
    mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    shift = scores.real.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    e = torch.where(mask, torch.exp(scores - shift), torch.zeros((), dtype=x.dtype,
                                                                 device=x.device))
    y = (e / e.sum(-1, keepdim=True)) @ v
    return complex_linear(y.transpose(1, 2).reshape(b, t, c), attn.o)


class ThickBlock(nn.Module):
    """Non-conservative pre-LN transformer block as a force, with damping c (log 003 §thick)."""

    conservative = False

    def __init__(self, n_embd: int, n_head: int, qk_norm: bool = False,
                 damping: float = 1.0) -> None:
        super().__init__()
        self.damping = damping
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, qk_norm)
        self.ln2 = nn.LayerNorm(n_embd)
        self.ffn = FeedForward(n_embd)

    def interaction(self, z: torch.Tensor) -> torch.Tensor:
        """Attn(LN1 z) + FFN(LN2 z): the part of F with an asymmetric Jacobian."""
        return self.attn(self.ln1(z)) + self.ffn(self.ln2(z))

    def forward(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return eq.force(z, x_in, self.interaction(z), self.damping)

    def interaction_complex(self, z: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn
        h = complex_gelu_tanh(complex_linear(complex_layer_norm(z, self.ln2), ffn.fc))
        return complex_attention(complex_layer_norm(z, self.ln1), self.attn) + complex_linear(
            h, ffn.proj)

    def forward_complex(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Holomorphic extension of ``forward`` (same parameters, complex state)."""
        return eq.force(z, x_in, self.interaction_complex(z), self.damping)


class ConservativeBlock(nn.Module):
    """Energy-based block: F = -dE/dz with

        E(z) = 1/2 |z - x_in|^2 + c/2 |z|^2 - sum_{heads,i} LSE_{j<=i}(q_i . k_j / sqrt d)
               - 1/2 |GELU(W_m LN2 z + b_m)|^2,   q, k from LN1 z (Q != K allowed).

    Attention folded into a log-sum-exp energy (value tied to the key) plus a Hopfield-style
    memory term; F is a gradient, so J is symmetric and EP needs no AEP correction.
    """

    conservative = True

    def __init__(self, n_embd: int, n_head: int, damping: float = 1.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.damping = damping
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = nn.ModuleDict({"q": nn.Linear(n_embd, n_embd), "k": nn.Linear(n_embd, n_embd)})
        self.ln2 = nn.LayerNorm(n_embd)
        self.ffn = nn.ModuleDict({"fc": nn.Linear(n_embd, 4 * n_embd)})

    def interaction_energy(self, z: torch.Tensor) -> torch.Tensor:
        b, t, c = z.shape
        h = self.n_head
        x = self.ln1(z)
        q = self.attn["q"](x).view(b, t, h, c // h).transpose(1, 2)
        k = self.attn["k"](x).view(b, t, h, c // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()
        lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
        mem = nn.functional.gelu(self.ffn["fc"](self.ln2(z)), approximate="tanh")
        return -lse.sum() - 0.5 * mem.pow(2).sum()

    def interaction(self, z: torch.Tensor) -> torch.Tensor:
        return -grad(self.interaction_energy)(z)

    def energy(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return (0.5 * (z - x_in).pow(2).sum() + 0.5 * self.damping * z.pow(2).sum()
                + self.interaction_energy(z))

    def forward(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return eq.force(z, x_in, self.interaction(z), self.damping)


def param_group(name: str) -> str:
    """Diagnostic group of an ``EquilibriumLM`` parameter name (cosines are reported per group)."""
    if name.startswith(("tok.", "pos.")):
        return "embeddings"
    if name.startswith("head."):
        return "head"
    if ".ln1." in name or ".ln2." in name or "_norm." in name:
        return "ln"
    for part in ("q", "k", "v", "o"):
        if f".attn.{part}." in name:
            return f"attn.{part}"
    if ".ffn." in name:
        return "ffn"
    raise ValueError(f"parameter {name!r} belongs to no diagnostic group")
