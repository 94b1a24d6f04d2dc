"""Direct feedback alignment (Nøkland 2016): credit for h_l is B_l e with B_l fixed random.

e = dL/dlogits of the batch-mean loss (softmax - onehot over B for CE), so the update has BP's
scale. B_l has i.i.d. N(0, feedback_scale^2 / d_out) entries: feedback_scale = 1 gives credits of
the same RMS as e per output unit; ``dfa_feedback_scale`` (the rule's calibration) matches it to BP's credit.
Every hidden state h_0..h_L (including the last) gets feedback; the head gets its delta rule.

The final LayerNorm. The head reads u = LN_f(h_L), not h_L, so B_l e is feedback *for u* (the
space the readout sees, where DFA's alignment argument holds: W_out aligns with B). It is mapped
to the residual stream by LN_f's own Jacobian at h_L (a vector-Jacobian product through the
head's first module, i.e. output-local, no hidden back-propagation):

    c_l = J_{LN_f}(h_L)^T B_l e

Without this, B_l e has components along h_L's mean and radius, which LN_f discards; they only
inflate the residual stream, and DFA on MNIST-1D did no better than training the head alone
(issue 13). Every block writes into the same residual stream that LN_f reads, so J_{LN_f}(h_L)
is the same projection for every l. With ``layernorm=False`` (LQ toy) LN_f is the identity and
this is plain DFA.

One feedback matrix for the residual stream (``feedback: shared``, the default). Every h_l
lives in the one residual stream the head reads (h_L = h_l + the later blocks' outputs), so a
block's update moves h_L along its own credit, and DFA's alignment (W_out -> B) can serve every
block only if they all receive the same projection of e: with an independent B_l per block
W_out aligns with their sum, i.e. with each B_l at ~1/sqrt(L+1). This is the DFA that trains
residual nets and Transformers in Launay et al. (2020, "Direct Feedback Alignment Scales to
Modern Deep Learning Tasks and Architectures"; their TinyDFA computes one global random
projection B e per step and feeds each layer the same projection, sliced to its width). B is
still fixed and random and never sees W_out. On MNIST-1D (20 epochs, 3 seeds) per-layer B_l
gave test accuracy 0.44 / 0.40 / 0.38 and Gamma 0.10-0.15; the shared B gives 0.55 on every
seed and Gamma 0.54. ``feedback: per_layer`` is Nøkland's independent B_l per layer (kept for
comparisons with runs that used it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.config.ff_rules.dfa import FFDFARule
from models.ff.mlp import DeepMLP, act_rms, apply_credit, grad_norms, true_state_grads
from models.ff.rules.base import Rule


class DFA(Rule):
    name = "dfa"

    def __init__(self, net: DeepMLP, cfg: FFDFARule | None = None, seed: int = 0) -> None:
        super().__init__(net, cfg or FFDFARule(), seed)
        self.net: DeepMLP = net
        n, w, k = len(net.layer_names()), net.cfg.width, net.cfg.d_out
        # B[i] feeds h_i (per_layer) or B[0] feeds every h_l (shared). Unit-variance draws
        # times a separate scale, so calibration can rescale in place.
        self.B = self.randn(n if self.cfg.feedback == "per_layer" else 1, w, k) / k**0.5
        fs = self.cfg.feedback_scale
        # "calibrated" starts at 1; the calibrate stage's value replaces it (apply_calibration)
        self.scale = torch.tensor(1.0 if fs == "calibrated" else float(fs), dtype=self.dtype,
                                  device=self.device)

    def calibrate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        return dfa_feedback_scale(self, x, y) if self.cfg.feedback_scale == "calibrated" else {}

    def apply_calibration(self, cal: dict[str, Any]) -> None:
        if self.cfg.feedback_scale == "calibrated":
            self.scale.fill_(cal["feedback_scale"])

    def buffers(self) -> dict[str, Tensor]:
        return {"B": self.B, "scale": self.scale}

    def feedback(self, layer: int) -> Tensor:
        """The fixed random matrix (width x d_out) that feeds h_layer."""
        return self.B[layer if self.cfg.feedback == "per_layer" else 0]

    def output_error(self, hs: list[Tensor], y: Tensor) -> Tensor:
        with torch.enable_grad():
            z = self.net.readout(hs[-1].detach()).detach().requires_grad_(True)
            (e,) = torch.autograd.grad(self.net.loss(z, y), z)
        return e

    def credits_from(self, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        """[J_{LN_f}(h_L)^T B_l e for l = 0..L] (see the module docstring)."""
        e = self.output_error(hs, y)
        with torch.enable_grad():
            top = hs[-1].detach().requires_grad_(True)
            u = self.net.ln_f(top)
            out: list[Tensor] = []
            for i in range(len(hs)):
                if self.cfg.feedback == "shared" and out:
                    out.append(out[0])
                    continue
                out.append(torch.autograd.grad(u, top,
                                               grad_outputs=self.scale * e @ self.feedback(i).T,
                                               retain_graph=True)[0])
            return out

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        cs = self.credits_from(hs, y)
        loss = apply_credit(self.net, x, hs, cs, y)
        return {"loss": float(loss), **grad_norms(self.net), **act_rms(self.net.layer_names(), hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.credits_from(hs, y)


def dfa_feedback_scale(rule: DFA, x: Tensor, y: Tensor) -> dict[str, float]:
    """Set the feedback scale so DFA credits have BP's RMS; returns the scale and the ratios."""
    _, g = true_state_grads(rule.net, x, y)
    with torch.no_grad():
        hs = rule.net.states(x)
    rule.scale.fill_(1.0)
    cs = rule.credits_from(hs, y)
    ratios = [float(t.pow(2).mean().sqrt() / (c.pow(2).mean().sqrt() + 1e-12))
              for c, t in zip(cs, g, strict=True)]
    scale = sum(ratios) / len(ratios)
    rule.scale.fill_(scale)
    return {"feedback_scale": scale, "ratio_min": min(ratios), "ratio_max": max(ratios)}
