"""A predictive-coding hierarchy for next-token prediction (METHODS §3 PC, log 001).

Orientation (Whittington & Bogacz 2017): the context -- the embeddings of the last K tokens,
concatenated -- is clamped at the top of the hierarchy; each layer's value is predicted from the
layer above, h_l ~ f_l(h_{l-1}) = W_l phi(h_{l-1}) + b_l (f_1 reads the embeddings), and the next
token is the sensory data at the bottom, explained by a softmax readout of h_L. Predictions flow
down, precision-weighted prediction errors flow up. Energy of a batch (sums over the batch):

    E(h) = sum_l pi_l / 2 * ||h_l - f_l(h_{l-1})||^2  +  beta * CE(readout(h_L), y)

During training the bottom is clamped to the observed next token through the CE term (a softmax
has no target vector, so the clamp is the likelihood). Inference settles h_1..h_L from the
prediction pass by Nesterov-accelerated gradient descent on E (FISTA momentum, restarted when
the momentum runs uphill, O'Donoghue & Candes 2015) with a per-layer step step / tau_l, tau_l
the top curvature of E's diagonal Hessian block in h_l at the prediction pass
(``time_constants``, a few power iterations on local quantities: the layer's precision, the
Jacobian and precision of the layer below, the softmax at the bottom). It stops when the
curvature-scaled drift ||dE/dh / tau|| is at most tol ||h|| (independent of ``step``, so a
smaller step cannot fake convergence), else at the iteration cap. The fixed point is the
minimiser of the same E (only the path to it changed), so the local update below is unchanged.
Optional Langevin noise sqrt(2 step / tau_l) sigma xi per iteration (annealed over training by
the trainer) helps leave shallow minima (log 001); it goes into the state, not the momentum, so
the states scatter as far as with plain gradient steps. The stop test reads the deterministic
drift, which also answers each kick: while the kicks are above tol ||h|| it cannot pass and the
loop runs to the cap (the first ~45 steps of the default run, noise 1e-3 vs tol 3e-4), so the
iteration count there measures the noise.

Why this scheme (default pc_seq run, seed 0, held-out windows; step 0 -> 300). The earlier
gradient descent with tau_l = pi_l + pi_{l+1} ||W_{l+1}||_2^2 (beta ||W_out||^2 / 2 at the
bottom) went from 25 iterations to the cap (80). As ||W||_2 grew (readout 1.1 -> 4.7, W_3
1.1 -> 3.1) that bound went 7x above the real curvature of the last layer (11.8 vs 1.7: the
softmax is confident and tanh saturates), and the condition number of the preconditioned
Hessian rose from 10-11 to 72-112 (per window). Its stop test then accepted states 20-30% of
the clamp's correction away from the fixed point (1% at init); reaching 1% took 370-430
iterations. With the measured block curvature the condition number is 28-42 instead. What
remains is structural: the slow mode (90% in h_3, 10% in h_2) moves h_2 and h_3 together along
W_3, so that eps_3 does not change, and costs only pi_2, so the condition number grows with
||W_3 D||^2. No per-layer step removes that; momentum turns kappa into sqrt(kappa) iterations.
To 1% of the correction it now takes 16-17 -> 26-42 (step 90) -> 46-57 iterations, and at tol
3e-4 17-18 -> 30-35 (the stop leaves 0.4-0.7% -> 4-4.5% of the correction). So settling does
not get shorter over training here, and cannot by a better step: the clamp's correction only
falls from 16% to 9% of ||h|| (CE 4.1 -> 1.5 nats, ||p - onehot(y)|| 0.99 -> 0.61), while the
conditioning worsens. Even windows the net predicts well (p(y) > 0.5, correction 3%) need more
iterations than at init. Where predictions do become right (tests: a learnable rule, CE <
0.01), the correction falls to 0.1% of ||h|| and settling drops from 9 iterations to 1.

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
def time_constants(net: PCNet, pi: Tensor, beta: float, hs: list[Tensor], y: Tensor,
                   iters: int = 10) -> list[float]:
    """tau_l, the top curvature of E's diagonal Hessian block in h_l at the states ``hs`` (the
    prediction pass, where the errors are zero). The block is pi_l I + pi_{l+1} D_l W_{l+1}^T
    W_{l+1} D_l with D_l = diag(phi'(h_l)), and in the last layer pi_L I + beta (D_L W_out^T S
    W_out D_L + diag(phi''(h_L) W_out^T (p - y))) with S = diag(p) - p p^T the softmax CE
    Hessian; tau_l = pi_l + the top eigenvalue (in magnitude) of the rest, by ``iters`` power
    iterations per sample from a fixed start, the largest over the batch. Each energy term
    couples two layers, so the whole Hessian is at most twice its diagonal blocks: step / tau_l
    with step < 2/3 keeps the accelerated iteration stable. The bound pi_{l+1} ||W_{l+1}||_2^2
    (beta ||W_out||^2 / 2) ignores phi' and S: 7x above tau_L late in the default run."""
    start = torch.Generator().manual_seed(0)
    tau = []
    for i, h in enumerate(hs):
        d, dd = _dphi(net, h)
        if i + 1 < len(hs):
            w, scale = net.layers[i + 1].weight, pi[i + 1]

            def curv(v: Tensor, w: Tensor = w, d: Tensor = d, scale: Tensor = scale) -> Tensor:
                return scale * d * ((d * v) @ w.T @ w)
        else:
            w, p = net.readout.weight, torch.softmax(net.logits(h), -1)
            diag = beta * dd * ((p - F.one_hot(y, p.shape[-1]).to(p.dtype)) @ w)

            def curv(v: Tensor, w: Tensor = w, d: Tensor = d, p: Tensor = p,
                     diag: Tensor = diag) -> Tensor:
                u = (d * v) @ w.T
                return beta * d * ((p * u - p * (p * u).sum(-1, keepdim=True)) @ w) + diag * v
        v = torch.randn(h.shape, generator=start, dtype=h.dtype).to(h.device)
        lam = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        for _ in range(iters):
            u = curv(v)
            lam = u.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-30)
            v = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        tau.append(float(pi[i] + lam.max()))
    return tau


def _dphi(net: PCNet, h: Tensor) -> tuple[Tensor, Tensor]:
    """phi'(h) and phi''(h), elementwise (tanh or GELU)."""
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        d1 = torch.autograd.grad(net.phi(x).sum(), x, create_graph=True)[0]
        return d1.detach(), torch.autograd.grad(d1.sum(), x)[0]


@dataclass(frozen=True)
class Settled:
    states: list[Tensor]
    iters: int
    residual: float


def _momentum(t: float) -> tuple[float, float]:
    """FISTA's sequence: the next t and this iteration's momentum (t - 1) / t_next."""
    t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
    return t_next, (t - 1) / t_next


def settle(net: PCNet, x: Tensor, y: Tensor, pi: Tensor, beta: float, cfg: SettleConfig,
           step: float, noise: float = 0.0, generator: torch.Generator | None = None) -> Settled:
    """Settle from the prediction pass with the output clamped to ``y`` (module doc): Nesterov
    steps of step / tau_l with gradient restart and Langevin noise; stops when the
    curvature-scaled drift ||dE/dh / tau|| is at most ``tol`` ||h||."""
    pi = pi.detach()
    with torch.no_grad():
        top = net.top(x)
        hs = net.states(x)
    tau = time_constants(net, pi, beta, hs, y)
    steps = [step / t for t in tau]
    vel = [torch.zeros_like(h) for h in hs]
    t, iters, res = 1.0, 0, math.inf
    while iters < cfg.max_iters:
        iters += 1
        t_next, m = _momentum(t)
        ahead = [h + m * v for h, v in zip(hs, vel, strict=True)]
        with torch.enable_grad():
            ahead = [a.detach().requires_grad_(True) for a in ahead]
            grads = torch.autograd.grad(energy(net, top, ahead, y, pi, beta), ahead)
        with torch.no_grad():
            moved = [a - s * g for a, s, g in zip(ahead, steps, grads, strict=True)]
            vel = [n - h for n, h in zip(moved, hs, strict=True)]
            uphill, drift2, size2 = torch.stack([  # one host sync per iteration
                sum((g * v).sum() for g, v in zip(grads, vel, strict=True)),
                sum(g.pow(2).sum() / tt ** 2 for g, tt in zip(grads, tau, strict=True)),
                sum(a.pow(2).sum() for a in ahead)]).tolist()
            if uphill > 0:
                t_next = 1.0  # restart: the momentum runs uphill (O'Donoghue & Candes 2015)
            res = math.sqrt(drift2) / (math.sqrt(size2) + 1e-12)
            hs = [n.detach() for n in moved]
            if noise > 0:  # into the state, not the velocity: each kick relaxes as in GD
                hs = [h + math.sqrt(2 * s) * noise * _randn(h, generator)
                      for h, s in zip(hs, steps, strict=True)]
        t = t_next
        if res <= cfg.tol:
            break
    return Settled(hs, iters, res)


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
    """BP through ``iters`` settling iterations (the memory twin): the same Nesterov steps as
    ``settle`` without noise, the graph of every iteration kept and the CE at the settled
    output differentiated through all of them."""
    pi = pi.detach()
    params = list(net.parameters())
    with torch.enable_grad():
        top = net.top(x)
        hs = net.states(x)
        tau = time_constants(net, pi, beta, [h.detach() for h in hs], y)
        vel = [torch.zeros_like(h) for h in hs]
        t = 1.0
        for _ in range(iters):
            t_next, m = _momentum(t)
            ahead = [h + m * v for h, v in zip(hs, vel, strict=True)]
            grads = torch.autograd.grad(energy(net, top, ahead, y, pi, beta), ahead,
                                        create_graph=True)
            moved = [a - step / tt * g for a, tt, g in zip(ahead, tau, grads, strict=True)]
            vel = [n - h for n, h in zip(moved, hs, strict=True)]
            if sum(float((g * v).detach().sum()) for g, v in zip(grads, vel, strict=True)) > 0:
                t_next = 1.0
            hs, t = moved, t_next
        loss = F.cross_entropy(net.logits(hs[-1]), y)
        return list(torch.autograd.grad(loss, params))
