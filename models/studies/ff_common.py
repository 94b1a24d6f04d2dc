"""What the feed-forward rule studies share: building a rule from its row, calibration, a
``models.ff`` rule behind the trainer's contract (``FFRule``), and the credit metrics.

A run trains with ``models.training.trainer.Trainer`` on ``Epochs`` of the fit split (whole
passes, each in a fresh permutation, drop-last) and evaluates on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.config.ff import FFModelConfig
from models.ff import metrics, rules
from models.ff.energy import EnergyMLP, EnergyMLPConfig
from models.ff.mlp import DeepMLP, MLPConfig, evaluate, true_state_grads
from models.ff.rules import Rule
from models.ff.tasks import Split
from models.training.batches import Batches, Epochs
from models.training.trainer import LearningRule, Trainer

DIAG_BATCH = 512  # held-out examples the credit metrics are computed on
CAL_BATCH = 512  # fit examples calibration measures on
SPLIT_SEED = 20_240  # the fit/val split is the same for every row and seed


@dataclass
class Data:
    """fit (trained on), val (evaluate during training), test (diagnose only)."""

    x_fit: Tensor
    y_fit: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device) -> Data:
        return Data(*(t.to(device) for t in (self.x_fit, self.y_fit, self.x_val, self.y_val,
                                              self.x_test, self.y_test)))


def split_val(split: Split, val_fraction: float) -> Data:
    """Carve a validation part out of the train split (fixed permutation, test untouched)."""
    n = len(split.x_train)
    n_val = round(val_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    fit, val = perm[n_val:], perm[:n_val]
    return Data(split.x_train[fit], split.y_train[fit], split.x_train[val], split.y_train[val],
                split.x_test, split.y_test)


def mlp_config(m: FFModelConfig, d_in: int, d_out: int) -> MLPConfig:
    return MLPConfig(d_in=d_in, d_out=d_out, width=m.width, depth=m.depth,
                     block_layers=m.block_layers, d_ff=m.d_ff, act=m.act, layernorm=m.layernorm)


def energy_config(m: FFModelConfig, d_in: int, d_out: int) -> EnergyMLPConfig:
    return EnergyMLPConfig(d_in=d_in, d_out=d_out, hidden=list(m.energy_hidden),
                           act=m.energy_act, dt=m.energy_dt, free_steps=m.energy_free_steps,
                           tol=m.energy_tol, momentum=m.energy_momentum)


def build_rule(rule_cfg: Any, net: nn.Module, seed: int, epochs: int) -> Rule:
    """The models.ff rule of a params row: the row's config class as it is, the run's seed and
    epochs (``models.ff.rules.build``)."""
    return rules.build(rule_cfg, net, seed, epochs)


def uses_energy_net(rule_cfg: Any) -> bool:
    """EP (and its head-only baseline) train the energy-based MLP instead of the pre-LN MLP."""
    return bool(rule_cfg.uses_energy_net())


def make_net(seed: int, factory: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """Initialise a net from ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = factory()
    return net.to(device)


# ---------------------------------------------------------------- calibration
def calibrate_rule(rule_cfg: Any, rule: Rule, x: Tensor, y: Tensor) -> dict[str, Any]:
    """What every row records before training (the pre-LN net's initial loss and activation
    RMS) and what the rule itself measures (``Rule.calibrate``: DFA's feedback scale, DTP's
    inverse pre-training, PC's settling step, EP's free residual; METHODS §3)."""
    out: dict[str, Any] = {"kind": rule_cfg.kind}
    net = rule.net
    if isinstance(net, DeepMLP):
        ev = evaluate(net, x, y)
        out["init_loss"] = ev["loss"]
        with torch.no_grad():
            out["act_rms"] = [float(h.pow(2).mean().sqrt()) for h in net.states(x)]
    out.update(rule.calibrate(x, y))
    return out


# ---------------------------------------------------------------- training
BETAS = (0.9, 0.999)  # AdamW's defaults: what the rules' learning rates were chosen with
EPOCH_SEED = 104_729  # the epochs' permutations: seed + EPOCH_SEED


class FFRule(LearningRule):
    """A ``models.ff`` rule behind the trainer's contract: the rule writes ``p.grad`` of the net
    (``update``: its estimators learn, then the weight update), and hears of each epoch's start.

    With ``train_net`` False (the LQ toy's fixed system) only the estimators learn (``learn``)
    and the net gets no gradient, so the trainer never steps it.
    """

    def __init__(self, rule: Rule, steps_per_epoch: int, train_net: bool = True) -> None:
        self.rule, self.steps_per_epoch, self.train_net = rule, steps_per_epoch, train_net

    def pretrain(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """The rule's step-0 work on the fit split (DTP: pre-train this run's inverses)."""
        assert isinstance(batches, Epochs)
        return self.rule.pretrain(batches.x, batches.y)

    def grads(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int,
              ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        x, y = batch
        if step % self.steps_per_epoch == 0:
            self.rule.set_epoch(step // self.steps_per_epoch)
        if not self.train_net:
            stats = self.rule.learn(x, y)
            with torch.no_grad():
                stats["loss"] = float(model.loss(model(x), y))  # type: ignore[operator]
            return {}, stats
        stats = self.rule.update(x, y)
        # the rule's update/<layer> is the norm of the gradient it wrote: the trainer's grad/
        return None, {k: v for k, v in stats.items() if not k.startswith("update/")}

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)


def held_out(net: nn.Module, x: Tensor, y: Tensor, split: str) -> dict[str, float]:
    """``<split>_loss`` and, for class labels, ``<split>_accuracy``."""
    ev = evaluate(net, x, y)
    return {f"{split}_loss": ev["loss"],
            **({f"{split}_accuracy": ev["accuracy"]} if "accuracy" in ev else {})}


def make_rule(rule_cfg: Any, net: nn.Module, seed: int, epochs: int,
              calibration: dict[str, Any]) -> Rule:
    """The row's rule on ``net``, with what calibration measured."""
    rule = build_rule(rule_cfg, net, seed, epochs)
    rule.apply_calibration(calibration)
    return rule


def make_trainer(rule_cfg: Any, rule: Rule, data: Data, train_cfg: Any, seed: int,
                 train_net: bool = True,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> Trainer:
    """A row's trainer: ``rule`` on its net, epochs over the fit split, evaluated on the
    validation split (or by ``evaluate``)."""
    batches = Epochs(data.x_fit, data.y_fit, train_cfg.batch_size, seed + EPOCH_SEED)
    return Trainer(rule.net, FFRule(rule, batches.steps_per_epoch, train_net),
                   batches, evaluate or (lambda m: held_out(m, data.x_val, data.y_val, "val")),
                   train_cfg, groups=rule.net.param_groups(), betas=BETAS)  # type: ignore[operator]


def ff_rule(trainer: Trainer) -> Rule:
    """The ``models.ff`` rule a trainer of these studies trains with."""
    assert isinstance(trainer.rule, FFRule)
    return trainer.rule.rule


# ---------------------------------------------------------------- metrics
def _flat(prefix: str, d: dict[str, float]) -> dict[str, float]:
    return {(prefix if k == "mean" else f"{prefix}/{k}"): v for k, v in d.items()}


def credit_metrics(rule: Rule, x: Tensor, y: Tensor) -> tuple[dict[str, float], list[Tensor]]:
    """Gamma (BP cosine of the weight update), rho and nudge on (x, y); per layer and mean.

    Both the credits and the weight update (``rule.grads``) are taken with the rule's
    estimators as training left them: no auxiliary module steps on these held-out examples.
    """
    net = rule.net
    credits = rule.credit(x, y)
    if isinstance(net, EnergyMLP):
        bp, true = ep_reference(net, x, y)
    else:
        net.zero_grad(set_to_none=False)
        with torch.enable_grad():
            net.loss(net(x), y).backward()
        bp = metrics.layer_grads(net.param_groups())
        true = true_state_grads(net, x, y)[1]
    rule.grads(x, y)
    mine = metrics.layer_grads(net.param_groups())  # type: ignore[operator]
    out = {**_flat("gamma", metrics.bp_cosine(mine, bp)),
           **_flat("rho", metrics.rho(credits, true))}
    if isinstance(net, DeepMLP):
        out.update(_flat("nudge", metrics.nudge(lambda i, h: net.loss_from(i, h, y),
                                                net.states(x), credits)))
    net.zero_grad(set_to_none=False)
    return out, credits


def ep_reference(net: EnergyMLP, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
    """BP through the unrolled free phase: parameter gradients, and dL/d(current into s_k) (the
    adjoint EP's credit estimates) via zero currents added to the energy.

    The unroll is ``free_steps`` plain projected steps started at the relaxed free state s*
    (the free phase's own solver, to its tolerance): at a fixed point this is the implicit
    gradient at s* truncated after ``free_steps`` terms of its Neumann series, the gradient EP
    estimates, whatever solver found s*."""
    currents = [x.new_zeros(x.shape[0], d, requires_grad=True) for d in net.cfg.hidden]
    s = [t.detach().requires_grad_(True) for t in net.relax(x, net.cfg.free_steps)[0]]
    groups = net.param_groups()
    params = [p for ps in groups.values() for p in ps]
    with torch.enable_grad():
        for _ in range(net.cfg.free_steps):
            s = net.step(x, s, currents=currents, create_graph=True)
        loss = net.loss(net.readout(s[-1]), y)
        grads = torch.autograd.grad(loss, params + currents, allow_unused=True)
    pg = grads[:len(params)]
    out, i = {}, 0
    for name, ps in groups.items():
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(pg[i:i + len(ps)], ps, strict=True)])
        i += len(ps)
    return out, [g.detach() for g in grads[len(params):]]


def target_norms(names: list[str], credits: list[Tensor]) -> dict[str, float]:
    """``target/<layer>``: mean per-sample norm of the rule's credit (vanishing-through-depth)."""
    return {f"target/{n}": float(c.norm(dim=-1).mean()) for n, c in zip(names, credits,
                                                                          strict=True)}
