"""Deep pre-LN residual MLP shared by every feed-forward learning rule (METHODS §3).

Layers, in the order rules address them (``layer_names``):

- ``inp``: h_0 = W_in x + b_in (input projection),
- ``block{l}``, l = 1..L: h_l = h_{l-1} + f_l(LN(h_{l-1})), f one or two linear layers with a
  configurable nonlinearity (``phi`` is the ladder's phi_a(z) = (1-a) z + a tanh(z)),
- ``head``: logits = W_out LN_f(h_L) + b_out (LN_f only when ``layernorm``), loss CE or MSE.

Rules see the hidden states [h_0, ..., h_L] and turn a credit signal c_l (their stand-in for
dL/dh_l) into weight gradients with ``apply_credit``: each layer back-propagates its credit only
through its own parameters (input detached), which is what "local update" means here. The head
always gets its own output-local gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def phi(z: Tensor, a: float) -> Tensor:
    """Nonlinearity ladder: a=0 is linear, a=1 is tanh."""
    return (1.0 - a) * z + a * torch.tanh(z)


def activation(name: str, a: float = 1.0) -> Callable[[Tensor], Tensor]:
    """Elementwise nonlinearity by name (``phi`` takes the ladder coefficient ``a``)."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "identity": lambda z: z,
        "tanh": torch.tanh,
        "relu": F.relu,
        "gelu": F.gelu,
        "sigmoid": torch.sigmoid,
        "phi": partial(phi, a=a),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(table)}")
    return table[name]


@dataclass
class MLPConfig:
    d_in: int
    d_out: int
    width: int = 128
    depth: int = 4  # number of residual blocks L
    block_layers: int = 2  # f is one layer (act(W LN h)) or two (W2 act(W1 LN h))
    d_ff: int | None = None  # hidden width of a two-layer f; None = 4 * width
    act: str = "gelu"
    phi_a: float = 1.0  # only used when act == "phi"
    layernorm: bool = True  # False gives a plain residual net (linear when act is identity)
    loss: str = "ce"  # "ce" (class labels) or "mse" (targets, 0.5 * squared error summed)


class Block(nn.Module):
    """Residual map h + f(LN(h)); also reused as residual inverse / bridge map by the rules."""

    def __init__(self, width: int, layers: int, d_ff: int, act: Callable[[Tensor], Tensor],
                 layernorm: bool) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"block_layers must be 1 or 2, got {layers}")
        self.ln: nn.Module = nn.LayerNorm(width) if layernorm else nn.Identity()
        self.act = act
        self.fc1 = nn.Linear(width, d_ff if layers == 2 else width)
        self.fc2 = nn.Linear(d_ff, width) if layers == 2 else None

    def residual(self, h: Tensor) -> Tensor:
        u = self.act(self.fc1(self.ln(h)))
        return u if self.fc2 is None else self.fc2(u)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.residual(h)


def make_block(cfg: MLPConfig) -> Block:
    d_ff = cfg.d_ff or 4 * cfg.width
    return Block(cfg.width, cfg.block_layers, d_ff, activation(cfg.act, cfg.phi_a), cfg.layernorm)


class DeepMLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.d_in, cfg.width)
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.depth))
        self.ln_f: nn.Module = nn.LayerNorm(cfg.width) if cfg.layernorm else nn.Identity()
        self.head = nn.Linear(cfg.width, cfg.d_out)

    # --- structure -------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Names of the hidden-state-producing layers, index l gives h_l."""
        return ["inp"] + [f"block{i}" for i in range(1, len(self.blocks) + 1)]

    def layer_modules(self) -> list[nn.Module]:
        return [self.inp, *self.blocks]

    def head_modules(self) -> list[nn.Module]:
        return [self.ln_f, self.head]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per layer name (hidden layers, then ``head``)."""
        groups = {n: list(m.parameters()) for n, m in zip(self.layer_names(),
                                                           self.layer_modules(), strict=True)}
        groups["head"] = [p for m in self.head_modules() for p in m.parameters()]
        return groups

    # --- forward pieces --------------------------------------------------------------------
    def layer(self, idx: int, inp: Tensor) -> Tensor:
        """h_idx from its input (x for idx 0, h_{idx-1} otherwise)."""
        return self.inp(inp) if idx == 0 else self.blocks[idx - 1](inp)

    def states(self, x: Tensor) -> list[Tensor]:
        hs = [self.inp(x)]
        for blk in self.blocks:
            hs.append(blk(hs[-1]))
        return hs

    def readout(self, h_last: Tensor) -> Tensor:
        return self.head(self.ln_f(h_last))

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.states(x)[-1])

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean over the batch (CE) or mean over the batch of 0.5 * ||out - y||^2 (MSE)."""
        if self.cfg.loss == "ce":
            return F.cross_entropy(out, y)
        if self.cfg.loss == "mse":
            return 0.5 * (out - y).pow(2).sum(-1).mean()
        raise ValueError(f"unknown loss {self.cfg.loss!r}")

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.cfg.loss == "ce":
            return F.cross_entropy(out, y, reduction="none")
        return 0.5 * (out - y).pow(2).sum(-1)

    def loss_from(self, idx: int, h: Tensor, y: Tensor) -> Tensor:
        """Loss when h_idx is replaced by ``h`` and the rest of the net runs forward."""
        for blk in self.blocks[idx:]:
            h = blk(h)
        return self.loss(self.readout(h), y)

    def output_grad(self, h_last: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, dL/dh_L) through the head only: output-local, no hidden back-propagation."""
        h = h_last.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(self.readout(h), y)
            (g,) = torch.autograd.grad(loss, h)
        return loss.detach(), g


def true_state_grads(net: DeepMLP, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(loss, [dL/dh_0, ..., dL/dh_L]) by back-propagation: the reference for every metric."""
    with torch.enable_grad():
        hs = net.states(x)
        loss = net.loss(net.readout(hs[-1]), y)
        grads = torch.autograd.grad(loss, hs)
    return loss.detach(), [g.detach() for g in grads]


def apply_credit(net: DeepMLP, x: Tensor, hs: list[Tensor], credits: list[Tensor],
                 y: Tensor) -> Tensor:
    """Write local weight gradients into ``p.grad`` and return the loss.

    Layer l gets d<c_l, layer_l(h_{l-1})>/dtheta_l with h_{l-1} detached (for a one-layer block
    with nonlinearity f this is (c_l * f'(a_l)) LN(h_{l-1})^T, the classic local rule). The head
    gets the gradient of the loss at h_L, which only needs output-local quantities.
    """
    net.zero_grad(set_to_none=False)
    with torch.enable_grad():
        total = x.new_zeros(())
        for idx, c in enumerate(credits):
            inp = x if idx == 0 else hs[idx - 1].detach()
            total = total + (net.layer(idx, inp) * c.detach()).sum()
        loss = net.loss(net.readout(hs[-1].detach()), y)
        (total + loss).backward()
    return loss.detach()


def grad_norms(net: DeepMLP) -> dict[str, float]:
    """``update/<layer>``: norm of the gradient just written, per layer."""
    out = {}
    for name, ps in net.param_groups().items():
        sq = sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None)
        out[f"update/{name}"] = sq ** 0.5
    return out


def act_rms(names: list[str], hs: list[Tensor]) -> dict[str, float]:
    return {f"act/{n}": float(h.detach().pow(2).mean().sqrt()) for n, h in zip(names, hs,
                                                                              strict=True)}


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Held-out loss and accuracy (accuracy only for class labels)."""
    was = net.training
    net.eval()
    out = net(x)
    loss = net.loss(out, y)
    net.train(was)
    res = {"loss": float(loss)}
    if y.dtype in (torch.int64, torch.int32):
        res["accuracy"] = float((out.argmax(-1) == y).float().mean())
    return res
