"""A latent world model on token sequences (RSSM-style) and its training by difference target
propagation through layers and time (METHODS §3 DTP, log 000).

Model, per position t of a window (x_t the input token, y_t = x_{t+1} the next one):

    u_t = [z_{t-1}, e(x_t)]                               (z_{-1} = 0, h_{-1} = 0)
    h_t = (1 - a) h_{t-1} + a tanh(W_h [h_{t-1}, u_t] + b)   deterministic state, S slots x d_s
    p(z_t | h_t) = N(mu_p, sigma_p^2)                     prior
    q(z_t | h_t, e(y_t)) = N(mu_q, sigma_q^2)             posterior; z_t = mu_q + sigma_q eps_t
    d_t = tanh(W_d [h_t, z_t] + b_d),  logits_t = W_o d_t + b_o     token decoder

Objective per token: CE(logits_t, y_t) + w KL(q_t || p_t) (the ELBO). The BP twin minimises it
by backprop through time. Prediction (held-out CE, entropy, samples) uses the prior: the
predictive distribution is the mean over prior samples of the decoder's softmax, so no position
sees its own token.

DTP (Lee et al. 2015), top-down through the layers of each step and backwards through time:

    tau_d = d - eta * dCE_t/dd                                  top target from the loss
    dc_t  = G_d(tau_d) - G_d(d)  -> split into dh^dec_t, dz_t     decoder inverse, c = [h, z]
    dh_t  = dh^dec_t + g * (G_h(h_{t+1} + dh_{t+1}; u_{t+1}) - G_h(h_{t+1}; u_{t+1}))
    tau_h_t = h_t + dh_t,  tau_z_t = z_t + dz_t

(``difference_targets`` is the formula on a chain). The inverses G_h (one step back in time,
conditioned on the step's input) and G_d have residual connections and LayerNorm: G_h(v; u) =
v + MLP(LN([v, u])) starts as the identity and G_d(d) = P d + MLP(LN(d)) starts at P =
pinv(W_d). They learn by difference reconstruction on noise-perturbed inputs,
||G(f(v + n)) - G(f(v)) - n||^2 / sigma^2, which makes the difference correction exact around
the current state. An exact inverse of a contracting map expands differences (the decoder's
pinv by ~5x at init, a leaky step by 1/(1 - a) per step back), so with ``keep_norm`` (default)
each hop keeps the direction the inverse gives and the RMS per unit of the difference it came
from (the state and latent parts of the decoder's inverse each)
(``preserve_norm``): target norms neither vanish (log 000: 0.8 per layer leaves 0.8^5 = 0.33)
nor explode through depth and time. g (``time_gain``) scales what a state target sends one step
back; the state's difference sums the decoder's and the future's, so its norm is bounded by
|dh^dec| / (1 - g), and calibration picks the largest g in (0, 1] that keeps the earliest
state's target norm within 2x of the top's.

Each layer then minimises its own precision-weighted distance to its target with its inputs
detached (no gradient crosses a layer or a time step): the decoder pi_dec ||d - tau_d||^2 / 2eta,
the posterior pi_lat ||mu_q + sigma_q eps - tau_z||^2 / 2eta (eps fixed), the transition
pi_state ||h_t - tau_h_t||^2 / 2eta (h_{t-1}, z_{t-1} detached). The readout learns from its own
CE gradient and the prior and posterior from the KL term, both local to the modules they read.
The embedding table is a parameter of the layers that read it (transition and posterior). All
local losses are averaged over tokens, so at the top (h - tau)/eta is exactly the per-token BP
gradient and update scales match the BP twin's. The state receives no target from the KL term
and z_t none through time (h_{t+1} reads z_t but G_h returns only h_t): choices, written here.
Precision (``models.seq.precision``) weighs the three layers' target losses, learned from their
mean squared target distances, floored and damped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config.seq import WorldModelConfig

LAYERS = ("dec", "latent", "state")  # precision order, top to bottom


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        h, z, e = cfg.slots * cfg.slot_dim, cfg.latent, cfg.n_embd
        self.h_dim = h
        self.emb = nn.Embedding(vocab_size, e)
        self.cell = nn.Linear(h + z + e, h)
        self.prior = nn.Linear(h, 2 * z)
        self.post = nn.Linear(h + e, 2 * z)
        self.dec = nn.Linear(h + z, cfg.dec_hidden)
        self.out = nn.Linear(cfg.dec_hidden, vocab_size)
        with torch.no_grad():  # prior ~ posterior ~ N(0, 1) at init: KL starts near 0 (log 000)
            for m in (self.prior, self.post):
                m.weight.mul_(0.1)
                m.bias.zero_()

    def step(self, h_prev: Tensor, u: Tensor) -> Tensor:
        a = self.cfg.leak
        return (1 - a) * h_prev + a * torch.tanh(self.cell(torch.cat([h_prev, u], -1)))

    @staticmethod
    def gaussian(params: Tensor) -> tuple[Tensor, Tensor]:
        mu, s = params.chunk(2, -1)
        return mu, F.softplus(s + 0.5413) + 1e-3  # softplus(0.5413) = 1: sigma 1 at zero input

    def decode(self, h: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(self.dec(torch.cat([h, z], -1)))


@dataclass
class Rollout:
    """Per-step tensors of one window, each stacked over time as [T, B, ...]."""

    h_prev: Tensor
    u: Tensor
    h: Tensor
    z: Tensor
    eps: Tensor
    d: Tensor
    logits: Tensor
    kl: Tensor       # [T, B] KL(q || p) per token
    prior_mu: Tensor


def kl_normal(mu_q: Tensor, s_q: Tensor, mu_p: Tensor, s_p: Tensor) -> Tensor:
    """KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)), summed over the last dim."""
    return (torch.log(s_p / s_q) + (s_q.pow(2) + (mu_q - mu_p).pow(2)) / (2 * s_p.pow(2))
            - 0.5).sum(-1)


def rollout(model: WorldModel, x: Tensor, y: Tensor, eps: Tensor) -> Rollout:
    """Run the model over a window with posterior samples z_t = mu_q + sigma_q eps_t."""
    b, t_len = x.shape
    h = x.new_zeros((b, model.h_dim), dtype=model.cell.weight.dtype)
    z = h.new_zeros((b, model.cfg.latent))
    ex, ey = model.emb(x), model.emb(y)
    rec: dict[str, list[Tensor]] = {k: [] for k in ("h_prev", "u", "h", "z", "d", "logits", "kl",
                                                    "prior_mu")}
    for t in range(t_len):
        u = torch.cat([z, ex[:, t]], -1)
        rec["h_prev"].append(h)
        rec["u"].append(u)
        h = model.step(h, u)
        mu_p, s_p = model.gaussian(model.prior(h))
        mu_q, s_q = model.gaussian(model.post(torch.cat([h, ey[:, t]], -1)))
        z = mu_q + s_q * eps[t]
        d = model.decode(h, z)
        for k, v in (("h", h), ("z", z), ("d", d), ("logits", model.out(d)),
                     ("kl", kl_normal(mu_q, s_q, mu_p, s_p)), ("prior_mu", mu_p)):
            rec[k].append(v)
    return Rollout(eps=eps, **{k: torch.stack(v) for k, v in rec.items()})


def objective(model: WorldModel, r: Rollout, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(CE + w KL, CE, KL), each the mean per token."""
    ce = F.cross_entropy(r.logits.flatten(0, 1), y.t().flatten())
    kl = r.kl.mean()
    return ce + model.cfg.kl_weight * kl, ce, kl


class Inverse(nn.Module):
    """G(v; cond) = skip(v) + MLP(LN([v, cond])): residual and normalised (module doc). The
    MLP's last layer starts at zero, so G starts at its skip (identity, or pinv of a layer)."""

    def __init__(self, d_in: int, d_out: int, d_cond: int, hidden: int) -> None:
        super().__init__()
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        self.norm = nn.LayerNorm(d_in + d_cond)
        self.mlp = nn.Sequential(nn.Linear(d_in + d_cond, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, v: Tensor, cond: Tensor | None = None) -> Tensor:
        inp = v if cond is None else torch.cat([v, cond], -1)
        return self.skip(v) + self.mlp(self.norm(inp))


class Inverses(nn.Module):
    """G_d (decoder hidden -> [h, z]) and G_h (h_t -> h_{t-1} given u_t)."""

    def __init__(self, model: WorldModel, hidden: int) -> None:
        super().__init__()
        c = model.h_dim + model.cfg.latent
        self.dec = Inverse(model.cfg.dec_hidden, c, 0, hidden)
        self.state = Inverse(model.h_dim, model.h_dim, c - model.h_dim + model.cfg.n_embd,
                             hidden)
        with torch.no_grad():
            self.dec.skip.weight.copy_(torch.linalg.pinv(model.dec.weight.double()).float())


def preserve_norm(diff: Tensor, like: Tensor) -> Tensor:
    """``diff`` rescaled per row to the RMS per unit of ``like`` (the difference it was computed
    from): the inverse gives the direction, the magnitude per unit survives the hop (the norm,
    when the widths are equal). Zero rows stay zero."""
    n = diff.pow(2).mean(-1, keepdim=True).sqrt()
    want = like.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(n > 0, diff * want / n.clamp_min(1e-30), torch.zeros_like(diff))


def difference_targets(states: list[Tensor], tau_top: Tensor, inverses: list[nn.Module],
                       keep_norm: bool = False) -> list[Tensor]:
    """The DTP formula on a chain s_0 -> s_1 -> ... -> s_L with g_l: s_{l+1} -> s_l:
    tau_L = tau_top, tau_l = s_l + g_l(tau_{l+1}) - g_l(s_{l+1}) (with ``keep_norm`` the
    difference g_l(tau) - g_l(s) takes the norm of tau_{l+1} - s_{l+1})."""
    taus = [tau_top]
    for i in range(len(states) - 2, -1, -1):
        g = inverses[i]
        diff = g(taus[0]) - g(states[i + 1])
        if keep_norm:
            diff = preserve_norm(diff, taus[0] - states[i + 1])
        taus.insert(0, states[i] + diff)
    return taus


def reconstruction_loss(model: WorldModel, inv: Inverses, r: Rollout, sigma: float,
                        gen: torch.Generator) -> Tensor:
    """Difference reconstruction of both inverses on the window's states (mean over samples)."""
    c = torch.cat([r.h, r.z], -1).detach()
    n = sigma * _randn(c, gen)
    with torch.no_grad():
        f_pert, f_clean = model.decode(*(c + n).split([model.h_dim, model.cfg.latent], -1)), r.d
    rec_d = (inv.dec(f_pert) - inv.dec(f_clean) - n).pow(2).sum(-1).mean()
    h_prev, u = r.h_prev.detach(), r.u.detach()
    m = sigma * _randn(h_prev, gen)
    with torch.no_grad():
        g_pert, g_clean = model.step(h_prev + m, u), r.h
    rec_h = (inv.state(g_pert, u) - inv.state(g_clean, u) - m).pow(2).sum(-1).mean()
    return (rec_d + rec_h) / sigma**2


def _randn(like: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)


@dataclass
class Targets:
    d: Tensor        # [T, B, D]
    z: Tensor        # [T, B, Z]
    h: Tensor        # [T, B, H]
    dh_dec: Tensor   # the state's difference from the decoder path alone


@torch.no_grad()
def targets(model: WorldModel, inv: Inverses, r: Rollout, y: Tensor, eta: float,
            time_gain: float, keep_norm: bool = True) -> Targets:
    """Top target from the per-token loss gradient, decoder inverse, then backwards in time."""
    with torch.enable_grad():
        d = r.d.detach().requires_grad_(True)
        ce = F.cross_entropy(model.out(d).flatten(0, 1), y.t().flatten(), reduction="sum")
        (g_d,) = torch.autograd.grad(ce, d)
    tau_d = r.d - eta * g_d
    dc = inv.dec(tau_d) - inv.dec(r.d)
    dh_dec, dz = dc.split([model.h_dim, model.cfg.latent], -1)
    if keep_norm:  # per part: the state and the latent are parallel inputs of the decoder
        dh_dec, dz = preserve_norm(dh_dec, tau_d - r.d), preserve_norm(dz, tau_d - r.d)
    dh = torch.zeros_like(dh_dec)
    carry = torch.zeros_like(dh_dec[0])
    for t in range(r.h.shape[0] - 1, -1, -1):
        dh[t] = dh_dec[t] + time_gain * carry
        if t > 0:  # what h_t's target asks of h_{t-1}, through G_h conditioned on u_t
            carry = inv.state(r.h[t] + dh[t], r.u[t]) - inv.state(r.h[t], r.u[t])
            if keep_norm:
                carry = preserve_norm(carry, dh[t])
    return Targets(d=tau_d, z=r.z + dz, h=r.h + dh, dh_dec=dh_dec)


def local_loss(model: WorldModel, r: Rollout, x: Tensor, y: Tensor, tau: Targets,
               pi: Tensor, eta: float) -> Tensor:
    """Sum of the layer-local losses (module doc), inputs detached, mean over tokens."""
    h_prev, u, h, z = (v.detach() for v in (r.h_prev, r.u, r.h, r.z))
    n_tok = y.numel()
    ey = model.emb(y.t())  # [T, B, E]: the posterior reads the token it encodes
    e_in = model.emb(x.t())
    u_local = torch.cat([u[..., :model.cfg.latent], e_in], -1)  # embedding as f_h's parameter
    h_new = model.step(h_prev, u_local)
    mu_p, s_p = model.gaussian(model.prior(h))
    mu_q, s_q = model.gaussian(model.post(torch.cat([h, ey], -1)))
    z_new = mu_q + s_q * r.eps
    d_new = model.decode(h, z)
    ce = F.cross_entropy(model.out(r.d.detach()).flatten(0, 1), y.t().flatten(), reduction="sum")
    kl = kl_normal(mu_q, s_q, mu_p, s_p).sum()
    fit = (pi[0] * (d_new - tau.d).pow(2).sum() + pi[1] * (z_new - tau.z).pow(2).sum()
           + pi[2] * (h_new - tau.h).pow(2).sum()) / (2 * eta)
    return (ce + model.cfg.kl_weight * kl + fit) / n_tok


def target_stats(model: WorldModel, r: Rollout, tau: Targets) -> dict[str, float]:
    """``target/<layer>``: RMS per unit of tau - value (layers differ in width, so a norm per
    vector would rank them by size, not by signal), top to bottom, the earliest position's state
    last (the deepest point through time); ``coverage/state_slots`` and ``coverage/latent``."""
    cfg = model.cfg
    dd, dz, dh = tau.d - r.d, tau.z - r.z, tau.h - r.h
    slots = dh.reshape(*dh.shape[:-1], cfg.slots, cfg.slot_dim)
    return {
        "target/0_dec": rms(dd),
        "target/1_latent": rms(dz),
        "target/2_state": rms(dh),
        "target/3_state_first": rms(dh[0]),
        "coverage/state_slots": float(slot_mask(slots).float().mean()),
        "coverage/latent": float((dz.abs().flatten(0, -2) > 0).any(0).float().mean()),
    }


def rms(t: Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


def slot_mask(slots: Tensor) -> Tensor:
    """Per slot: did any position, sample or unit of the slot get a non-zero target? Slots are
    the second-to-last dim."""
    return (slots.abs() > 0).flatten(0, -3).any(0).any(-1)


def layer_mean_sq(r: Rollout, tau: Targets) -> Tensor:
    """Mean squared target distance per layer, precision order (dec, latent, state)."""
    return torch.stack([(tau.d - r.d).pow(2).mean(), (tau.z - r.z).pow(2).mean(),
                        (tau.h - r.h).pow(2).mean()]).detach()


@torch.no_grad()
def predictive(model: WorldModel, x: Tensor, y: Tensor, samples: int,
               gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-token predictive CE and entropy under the prior (mean over ``samples`` prior draws of
    the decoder's softmax); the state is filtered with the posterior of the observed tokens."""
    b, t_len = x.shape
    h = torch.zeros((b, model.h_dim), device=x.device, dtype=model.cell.weight.dtype)
    z = h.new_zeros((b, model.cfg.latent))
    ex, ey = model.emb(x), model.emb(y)
    ces, ents = [], []
    for t in range(t_len):
        h = model.step(h, torch.cat([z, ex[:, t]], -1))
        mu_p, s_p = model.gaussian(model.prior(h))
        zk = mu_p + s_p * _randn(mu_p.expand(samples, *mu_p.shape), gen)
        logp = model.out(model.decode(h.expand(samples, *h.shape), zk)).log_softmax(-1)
        mix = torch.logsumexp(logp, 0) - math.log(samples)
        ces.append(-mix.gather(-1, y[:, t:t + 1]).squeeze(-1))
        ents.append(-(mix.exp() * mix).sum(-1))
        mu_q, s_q = model.gaussian(model.post(torch.cat([h, ey[:, t]], -1)))
        z = mu_q + s_q * _randn(mu_q, gen)
    return torch.stack(ces), torch.stack(ents)


@torch.no_grad()
def generate(model: WorldModel, prompt: list[int], n: int, gen: torch.Generator,
             temperature: float = 0.8) -> list[int]:
    """Ancestral sampling: z from the prior, a token from the decoder, then the posterior of the
    sampled token updates the state (private generator: the global RNG is left alone)."""
    dev = model.cell.weight.device
    h = torch.zeros((1, model.h_dim), device=dev)
    z = h.new_zeros((1, model.cfg.latent))
    ids = list(prompt)
    for i in range(len(prompt) + n - 1):
        tok = torch.tensor([ids[i]], device=dev)
        h = model.step(h, torch.cat([z, model.emb(tok)], -1))
        if i + 1 >= len(ids):
            mu_p, s_p = model.gaussian(model.prior(h))
            zp = mu_p + s_p * _randn(mu_p, gen)
            probs = (model.out(model.decode(h, zp)) / temperature).softmax(-1)
            ids.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
        mu_q, s_q = model.gaussian(model.post(torch.cat([h, model.emb(torch.tensor(
            [ids[i + 1]], device=dev))], -1)))
        z = mu_q + s_q * _randn(mu_q, gen)
    return ids
