"""Credit bridge (log 002, METHODS §3): learned values V_l(h_l) ~ loss; credit_l = grad V_l.

The algorithm, choice by choice (the log fixes the first five; the rest are ours, with why):

1. **Values.** V_l(h_l, y) ~ l_i, the per-sample loss of the current net. V_l = v o R_l: a value
   head v on the output state (MLP [LN(h), target code] -> d_value -> 1; the code is the one-hot
   class for CE, the target for MSE, as l_i depends on y) and a bridge R_l with the block
   architecture (h + f(LN(h)), near the identity at init, as h_L is h_l plus the later residual
   branches) carrying h_l into that space; R_L = identity. Log 002 does not give the
   architecture; sharing v is what lets the output-local terminal gradient matching inform the
   hidden layers (our reading of "with it, the credit bridge matches the state bridge on the toy").
2. **Terminal gradient matching** (term_grad_weight = 1): at the output layer grad_h v(h_L, y) is
   fitted to the true per-sample dl_i/dh_L, which the head alone gives (output-local: no hidden
   back-propagation). Without it V learns the right values with uninformative gradients (log 002).
3. **Credit** a_l = grad_{h_l} V_l(h_l, y), normalised a / (RMS(a) + 1e-6) over the layer's batch
   tensor (log 002), then times RMS(dL/dh_L) of the batch-mean loss (output-local, from the head):
   the direction and the equal RMS across layers are the log's; the common factor gives the
   credit BP's units. (The log's unit-RMS credit is ~100x BP's scale: the jump from the DFA
   warm-up's BP-scaled credit to it left Adam's second-moment estimate lagging, and the global
   gradient clip then scaled the head's own gradient down with it.)
4. **DFA warm-up**: for the first ``warmup_frac`` (0.2) of ``epochs`` the net is trained with
   DFA credit (models.ff.rules.dfa, the study's DFA: shared feedback through LN_f's Jacobian)
   while v and the bridges already learn, so the value net does not bootstrap from an untrained
   net (log 002).
5. Losses, per sample, of the estimators (their own Adam, ``bridge_lr``), on the current batch
   before the net's update:
   - v:   sum (v(h_L) - l_i)^2 / sum l_i^2
          + term_grad_weight * sum ||grad v(h_L) - dl_i/dh_L||^2 / sum ||dl_i/dh_L||^2
          (both scale free, so term_grad_weight = 1 weighs them equally),
   - R_l: sum (v(R_l(h_l)) - l_i)^2 / sum l_i^2, stepping R_l only (v is fitted at the top).
6. **Counterfactual targets** (ours): each state is fitted at its own y and at another sample's
   (a batch permutation from the rule's RNG). V_l is a function of y too; at one y per state
   the value regression fixes only one level set of v per state, at two it also pins R_l down
   along the output directions the credit needs.
7. **The estimators must keep up with the net** (``bridge_lr`` = 1e-2, ten times the net's lr).
   V_l has to track a moving target, the loss of a net whose head and blocks change every step,
   and its gradient, not just its value, must be right. At bridge_lr = 1e-3 (issue 13's default
   run: MNIST-1D test accuracy 0.266 against 0.297 for the head alone) the value gradient still
   had a relative squared error of 0.8-0.9 when the warm-up ended (term/term_grad), so the
   first credit-bridge epochs pushed the net the wrong way, and even at the end, with
   per-sample cosine 0.99 at the top, the batch-summed credit (what a weight update sums) of
   the lower layers pointed against BP's. At 1e-2 term/term_grad is 0.03-0.04 when the warm-up
   ends and the rule reaches 0.559 / 0.563 / 0.561 (seeds 0-2, 20 epochs; 1e-3 under the same
   DFA warm-up: 0.278 / 0.290 / 0.281).

Nothing here back-propagates through the net's blocks: the net's layers get their credit from
v and R_l (estimators that see only h_l, h_L, the head's output gradient and y), and each layer
turns it into a weight update locally (``apply_credit``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config.ff_rules.credit_bridge import FFCreditBridgeRule
from models.config.ff_rules.dfa import FFDFARule
from models.ff.mlp import DeepMLP, act_rms, activation, apply_credit, grad_norms, make_block
from models.ff.rules.base import Rule
from models.ff.rules.dfa import DFA, dfa_feedback_scale


class ValueHead(nn.Module):
    """v(h, y): MLP on [LN(h), target code] -> d_value -> 1 (the per-sample loss needs y)."""

    def __init__(self, width: int, d_target: int, d_value: int, act: str,
                 layernorm: bool) -> None:
        super().__init__()
        self.ln: nn.Module = nn.LayerNorm(width) if layernorm else nn.Identity()
        self.fc1 = nn.Linear(width + d_target, d_value)
        self.act = activation(act if act != "identity" else "tanh")
        self.fc2 = nn.Linear(d_value, 1)

    def forward(self, h: Tensor, code: Tensor) -> Tensor:
        u = torch.cat([self.ln(h), code.expand(*h.shape[:-1], code.shape[-1])], dim=-1)
        return self.fc2(self.act(self.fc1(u))).squeeze(-1)


class CreditBridge(Rule):
    name = "credit_bridge"

    @classmethod
    def from_config(cls, net: nn.Module, cfg: Any, seed: int, epochs: int) -> CreditBridge:
        return cls(net, cfg, seed, epochs)  # type: ignore[arg-type]

    def calibrate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        if self.cfg.feedback_scale != "calibrated":
            return {}
        return dfa_feedback_scale(self.dfa, x, y)

    def apply_calibration(self, cal: dict[str, Any]) -> None:
        if self.cfg.feedback_scale == "calibrated":
            self.dfa.scale.fill_(cal["feedback_scale"])

    def __init__(self, net: DeepMLP, cfg: FFCreditBridgeRule | None = None, seed: int = 0,
                 epochs: int = 100) -> None:
        """``epochs``: the run's total epochs (the DFA warm-up is ``warmup_frac`` of them)."""
        super().__init__(net, cfg or FFCreditBridgeRule(), seed)
        self.epochs = epochs
        self.net: DeepMLP = net
        c, nc = self.cfg, net.cfg
        self.value = self.build(lambda: ValueHead(nc.width, nc.d_out, c.d_value, nc.act, nc.layernorm))
        self.bridges = self.build(lambda: nn.ModuleList(make_block(nc) for _ in range(nc.depth)))
        self.opt = torch.optim.Adam([*self.value.parameters(), *self.bridges.parameters()],
                                    lr=c.bridge_lr)
        self.dfa = DFA(net, FFDFARule(feedback_scale=c.feedback_scale), seed + 1)

    def aux(self) -> dict[str, object]:
        return {"value": self.value, "bridges": self.bridges, "opt": self.opt}

    def buffers(self) -> dict[str, Tensor]:
        return {"dfa_B": self.dfa.B, "dfa_scale": self.dfa.scale}

    def in_warmup(self) -> bool:
        return self.epoch < self.cfg.warmup_frac * self.epochs

    def code(self, y: Tensor) -> Tensor:
        """The target as the value's second input: one-hot class (CE) or the target (MSE)."""
        if self.net.cfg.loss == "ce":
            return F.one_hot(y, self.net.cfg.d_out).to(self.dtype)
        return y.to(self.dtype)

    def counterfactual(self, hs: list[Tensor], y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Each state twice: with its own target and with another sample's (a batch
        permutation from the rule's RNG). V_l(h, y) is a function of the target too, and
        fitting it at more than one y per state pins the bridge R_l down along the output
        directions the credit needs (one y fixes only one level set of v per state)."""
        perm = torch.randperm(len(y), generator=self.gen).to(y.device)
        return [torch.cat([h, h]) for h in hs], torch.cat([y, y[perm]])

    def train_values(self, hs: list[Tensor], y: Tensor) -> dict[str, float]:
        hs, y = self.counterfactual(hs, y)
        net, b = self.net, hs[-1].shape[0]
        with torch.no_grad():
            target = net.per_sample_loss(net.readout(hs[-1]), y)
        _, g_mean = net.output_grad(hs[-1], y)
        g_true = g_mean * b  # per-sample dl_i/dh_L
        code = self.code(y)
        vparams, rparams = list(self.value.parameters()), list(self.bridges.parameters())
        with torch.enable_grad():
            top = hs[-1].detach().requires_grad_(True)
            v_top = self.value(top, code)
            (g_v,) = torch.autograd.grad(v_top.sum(), top, create_graph=True)
            scale = target.pow(2).sum() + 1e-12  # scale-free, like the gradient term
            value_t = (v_top - target).pow(2).sum() / scale
            grad_t = (g_v - g_true).pow(2).sum() / (g_true.pow(2).sum() + 1e-12)
            hidden = sum(((self.value(r(h.detach()), code) - target).pow(2).sum() / scale
                          for r, h in zip(self.bridges, hs[:-1], strict=False)),
                         target.new_zeros(()))
            self.opt.zero_grad(set_to_none=False)
            (value_t + self.cfg.term_grad_weight * grad_t).backward(inputs=vparams)
            if rparams:
                hidden.backward(inputs=rparams)
        self.opt.step()
        return {"term/value_top": float(value_t.detach()),
                "term/term_grad": float(grad_t.detach()),
                "term/value_hidden": float(hidden.detach()) / max(len(self.bridges), 1)}

    def credits_from(self, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        code = self.code(y)
        _, g_top = self.net.output_grad(hs[-1], y)
        scale = g_top.pow(2).mean().sqrt()  # output-local: RMS of dL/dh_L
        maps = [*self.bridges, nn.Identity()]
        out = []
        with torch.enable_grad():
            for r, h in zip(maps, hs, strict=True):
                hh = h.detach().requires_grad_(True)
                (a,) = torch.autograd.grad(self.value(r(hh), code).sum(), hh)
                out.append(a / (a.pow(2).mean().sqrt() + 1e-6) * scale)
        return out

    def learn(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.train_values(hs, y)

    def grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            hs = self.net.states(x)
        warm = self.in_warmup()
        cs = self.dfa.credits_from(hs, y) if warm else self.credits_from(hs, y)
        loss = apply_credit(self.net, x, hs, cs, y)
        stats = {"loss": float(loss), "phase/dfa_warmup": float(warm)}
        return {**stats, **grad_norms(self.net), **act_rms(self.net.layer_names(), hs)}

    def credit(self, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            hs = self.net.states(x)
        return self.dfa.credits_from(hs, y) if self.in_warmup() else self.credits_from(hs, y)
