"""A predictive-coding hierarchy for next-token prediction (METHODS §3 PC, log 001).

Orientation (Whittington & Bogacz 2017): the context -- the embeddings of the last K tokens,
concatenated -- is clamped at the top of the hierarchy; each layer's value is predicted from the
layer above, h_l ~ f_l(h_{l-1}) = W_l phi(h_{l-1}) + b_l (f_1 reads the embeddings), and the next
token is the sensory data at the bottom, explained by a softmax readout of h_L. Predictions flow
down, precision-weighted prediction errors flow up. Energy of a batch (sums over the batch):

    E(h) = sum_l pi_l / 2 * ||h_l - f_l(h_{l-1})||^2  +  beta * CE(readout(h_L), y)

During training the bottom is clamped to the observed next token through the CE term (a softmax
has no target vector, so the clamp is the likelihood). Inference settles h_1..h_L from the
prediction pass by gradient descent, h_l <- h_l - (step / tau_l) dE/dh_l, with a per-layer time
constant tau_l (``time_constants``): a bound on the curvature of the two energy terms h_l sits
in, so the step stays stable as weights and precisions grow (a fixed step that is stable at
initialisation oscillates at the cap once the weights have grown), and the fixed point is
unchanged.
Optional Langevin noise sqrt(2 step) sigma xi (annealed by the trainer) helps leave shallow
minima (log 001); the stopping test uses the deterministic part of the move only, the relative
state change ||step dE/dh|| / ||h|| <= tol, else the iteration cap.

Learning is local: at the settled state h* (detached) each layer's parameters descend their own
term pi_l / 2 ||h*_l - f_l(h*_{l-1})||^2 (the readout descends beta CE at h*_L; the embeddings are
parameters of f_1), divided by beta * B so that in the small-error limit (beta -> 0) the update
is the BP gradient of the batch-mean CE: at equilibrium pi_L eps_L = -beta dCE/dh_L and
pi_l eps_l = J_{l+1}^T pi_{l+1} eps_{l+1}. Settling keeps no graph across iterations and the
local step differentiates one energy evaluation, so a training step needs the memory of a
settling step whatever the number of iterations; ``unrolled_grads`` is the BP-through-settling
twin used to show what that saves. Without the clamp the prediction pass is the exact minimum
of E (all errors zero), so evaluation is the plain prediction pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config.seq import PCModelConfig, SettleConfig


class PCNet(nn.Module):
    """Embedding, ``depth`` predicted layers, softmax readout (shared by the PC and BP rows)."""

    def __init__(self, cfg: PCModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(vocab_size, cfg.n_embd)
        dims = [cfg.context * cfg.n_embd] + [cfg.width] * cfg.depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.readout = nn.Linear(cfg.width, vocab_size)
        self.phi = torch.tanh if cfg.act == "tanh" else F.gelu

    def top(self, x: Tensor) -> Tensor:
        """The clamped top of the hierarchy: the context's embeddings, concatenated."""
        return self.emb(x).flatten(1)

    def predict(self, layer: int, above: Tensor) -> Tensor:
        """f_l: the prediction of layer ``layer`` from the layer above (the embeddings for 0)."""
        return self.layers[layer](above if layer == 0 else self.phi(above))

    def logits(self, h_last: Tensor) -> Tensor:
        return self.readout(self.phi(h_last))

    def states(self, x: Tensor) -> list[Tensor]:
        """The prediction pass: every layer at its prediction (zero errors)."""
        h, out = self.top(x), []
        for i in range(len(self.layers)):
            h = self.predict(i, h)
            out.append(h)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.states(x)[-1])

    def layer_params(self) -> list[list[nn.Parameter]]:
        """Parameters per layer: [emb + f_1], f_2, ..., f_L, readout (the local update's units)."""
        groups = [[*self.emb.parameters(), *self.layers[0].parameters()]]
        groups += [list(m.parameters()) for m in self.layers[1:]]
        return groups + [list(self.readout.parameters())]

    def layer_names(self) -> list[str]:
        return [f"h{i + 1}" for i in range(len(self.layers))] + ["out"]


def errors(net: PCNet, top: Tensor, hs: list[Tensor]) -> list[Tensor]:
    """eps_l = h_l - f_l(h_{l-1}), one per layer."""
    return [h - net.predict(i, top if i == 0 else hs[i - 1]) for i, h in enumerate(hs)]


def energy(net: PCNet, top: Tensor, hs: list[Tensor], y: Tensor, pi: Tensor,
           beta: float) -> Tensor:
    """E of the module doc, summed over the batch (per-sample dynamics ignore the batch size)."""
    e = sum(0.5 * pi[i] * eps.pow(2).sum() for i, eps in enumerate(errors(net, top, hs)))
    return e + beta * F.cross_entropy(net.logits(hs[-1]), y, reduction="sum")


@torch.no_grad()
def time_constants(net: PCNet, pi: Tensor, beta: float) -> Tensor:
    """tau_l = pi_l + pi_{l+1} ||W_{l+1}||_2^2 (beta ||W_out||_2^2 / 2 below the last layer):
    a bound on the curvature of E in h_l (phi' <= 1 for tanh and, nearly, GELU; the softmax
    CE's Hessian is at most 1/2), so step / tau_l stays stable as weights and precisions grow."""
    below = [m.weight for m in net.layers[1:]] + [net.readout.weight]
    weight = [pi[i + 1] if i + 1 < len(pi) else beta / 2 for i in range(len(pi))]
    return torch.stack([pi[i] + weight[i] * torch.linalg.matrix_norm(w, 2) ** 2
                        for i, w in enumerate(below)])


@dataclass(frozen=True)
class Settled:
    states: list[Tensor]
    iters: int
    residual: float


def settle(net: PCNet, x: Tensor, y: Tensor, pi: Tensor, beta: float, cfg: SettleConfig,
           step: float, noise: float = 0.0, generator: torch.Generator | None = None) -> Settled:
    """Settle from the prediction pass with the output clamped to ``y`` (module doc)."""
    pi = pi.detach()
    steps = (step / time_constants(net, pi, beta)).tolist()
    with torch.no_grad():
        top = net.top(x)
        hs = net.states(x)
    iters, res = 0, math.inf
    while iters < cfg.max_iters:
        iters += 1
        with torch.enable_grad():
            hs = [h.detach().requires_grad_(True) for h in hs]
            grads = torch.autograd.grad(energy(net, top, hs, y, pi, beta), hs)
        with torch.no_grad():
            moves = [s * g for s, g in zip(steps, grads, strict=True)]
            num = math.sqrt(sum(float(m.pow(2).sum()) for m in moves))
            den = math.sqrt(sum(float(h.pow(2).sum()) for h in hs))
            res = num / (den + 1e-12)
            hs = [h - m for h, m in zip(hs, moves, strict=True)]
            if noise > 0:
                hs = [h + math.sqrt(2 * s) * noise * _randn(h, generator)
                      for h, s in zip(hs, steps, strict=True)]
        if res <= cfg.tol:
            break
    return Settled([h.detach() for h in hs], iters, res)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise from a CPU generator (so CUDA runs reproduce and checkpoint the same stream)."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def local_grads(net: PCNet, x: Tensor, hs: list[Tensor], y: Tensor, pi: Tensor,
                beta: float) -> list[Tensor]:
    """The local update at the settled state: each parameter's gradient of its own layer's term,
    over beta * B (the BP gradient of the batch-mean CE in the small-error limit). Returns the
    gradients in ``net.parameters()`` order."""
    hs = [h.detach() for h in hs]
    params = list(net.parameters())
    with torch.enable_grad():
        e = energy(net, net.top(x), hs, y, pi.detach(), beta)
        grads = torch.autograd.grad(e, params)
    scale = 1.0 / (beta * x.shape[0])
    return [g * scale for g in grads]


def credits(net: PCNet, x: Tensor, hs: list[Tensor], pi: Tensor, beta: float) -> list[Tensor]:
    """-pi_l eps_l / (beta B): the settled stand-in for dCE_mean/dh_l, per layer."""
    with torch.no_grad():
        eps = errors(net, net.top(x), hs)
    return [-pi[i] * e / (beta * x.shape[0]) for i, e in enumerate(eps)]


def unrolled_grads(net: PCNet, x: Tensor, y: Tensor, pi: Tensor, beta: float, step: float,
                   iters: int) -> list[Tensor]:
    """BP through ``iters`` settling steps (the memory twin): the graph of every iteration is
    kept and the CE at the settled output is differentiated through all of them."""
    pi = pi.detach()
    steps = (step / time_constants(net, pi, beta)).tolist()
    params = list(net.parameters())
    with torch.enable_grad():
        top = net.top(x)
        hs = net.states(x)
        for _ in range(iters):
            grads = torch.autograd.grad(energy(net, top, hs, y, pi, beta), hs, create_graph=True)
            hs = [h - s * g for h, s, g in zip(hs, steps, grads, strict=True)]
        loss = F.cross_entropy(net.logits(hs[-1]), y)
        return list(torch.autograd.grad(loss, params))
