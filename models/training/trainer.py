"""One trainer for every study: the optimisation step around a learning rule.

A study supplies the model, the rule (``LearningRule``), the batch source
(``models.training.batches``) and its evaluation; the trainer owns the rest, once: AdamW with
decay (matrices) and no-decay (vectors) groups built once, the learning rate (with per-layer gains
where a rule's recipe adapts them, ``models.training.layer_rates``), gradient clipping, the EMA of
the weights, the per-step statistics and the checkpointed state. ``train_step`` reads top to
bottom: batch, the rule's gradient, clip, AdamW, EMA, statistics.

Statistics (CONVENTIONS.md): ``grad/<group>`` is the norm of the rule's gradient *before*
clipping (clipping must not hide a runaway gradient from the health checks) and ``grad_norm`` its
global norm, ``update/<group>`` the norm of the change AdamW made; the groups are the study's
layers (``groups``) or else the named tensors. A parameter the rule gave no gradient this step (a
frozen layer, the LQ toy's fixed system) is neither stepped nor logged. All norms are read with
one host sync (a GPU step of the equilibrium LM takes ~50 ms; a sync per tensor costs several).
The rule's per-layer statistics (``LAYER_PREFIXES``) are served by ``layer_stats`` with these
norms and the rule's ``log_stats``; its other statistics by ``train_step``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from models.config import TrainConfig
from models.config.seq import LayerRateConfig
from models.training.batches import Batches
from models.training.ema import EMA
from models.training.layer_rates import LayerRates

LAYER_PREFIXES = ("grad/", "update/", "act/", "target/", "precision/")

Grads = dict[str, Tensor]
Stats = dict[str, float]


class LearningRule(ABC):
    """The contract between a learning rule and the trainer: ``grads``, and optionally a
    pre-training, statistics at logged steps and the rule's own state.

    ``model`` is the trainer's model; a rule built around a model (a ``models.ff`` rule, the fast
    EP engine) is built around this one.
    """

    @abstractmethod
    def grads(self, model: nn.Module, batch: Any, step: int) -> tuple[Grads | None, Stats]:
        """This step's update direction and statistics (CONVENTIONS.md keys).

        The directions map parameter names to tensors (a parameter left out is not stepped), or
        are None when the rule wrote ``p.grad`` itself (the ``models.ff`` rules).
        """

    def pretrain(self, model: nn.Module, batches: Batches) -> Stats:
        """Once, before step 0 (never on resume): train the rule's own estimators on this run's
        model, as calibration did on seed 0 (DTP's inverses); the statistics join step 0's."""
        return {}

    def log_stats(self, model: nn.Module) -> Stats:
        """Statistics taken only on logged steps, after the update (e.g. the fixed point at the
        new weights, means over the steps since the last logged one)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything the rule carries between steps (auxiliary nets and their optimizers,
        controllers, generators), for bit-exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Backprop(LearningRule):
    """The reference rule: the autograd gradient of the study's training objective,
    ``objective(model, batch) -> (loss, stats)``."""

    def __init__(self, objective: Callable[[nn.Module, Any], tuple[Tensor, Stats]]) -> None:
        self.objective = objective

    def grads(self, model: nn.Module, batch: Any, step: int) -> tuple[Grads, Stats]:
        names, params = zip(*model.named_parameters(), strict=True)
        with torch.enable_grad():
            loss, stats = self.objective(model, batch)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        return {n: g for n, g in zip(names, gs, strict=True) if g is not None}, stats


def adamw_groups(units: dict[str, list[nn.Parameter]], weight_decay: float,
                 ) -> list[dict[str, Any]]:
    """AdamW's parameter groups, per unit (its name under ``unit``, for per-unit LR gains):
    weight decay on matrices only; biases, norm gains and other vectors are not decayed."""
    groups = []
    for name, params in units.items():
        for decay in (True, False):
            ps = [p for p in params if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0,
                               "unit": name})
    return groups


class Trainer:
    """AdamW on ``model`` with the update directions of ``rule`` on batches of ``batches``.

    ``evaluate(model)`` returns the held-out metrics of a model (the EMA copy when the EMA is
    on); ``groups`` names the units of ``grad/`` and ``update/`` (default: each tensor);
    ``layer_rate`` turns on per-group LR gains (the groups are then AdamW's groups too).
    """

    def __init__(self, model: nn.Module, rule: LearningRule, batches: Batches,
                 evaluate: Callable[[nn.Module], Stats], cfg: TrainConfig, *,
                 groups: dict[str, list[nn.Parameter]] | None = None,
                 betas: tuple[float, float] = (0.9, 0.95),
                 layer_rate: LayerRateConfig | None = None) -> None:
        self.model, self.rule, self.batches, self.cfg = model, rule, batches, cfg
        self._evaluate = evaluate
        self.named = dict(model.named_parameters())
        self.groups = groups or {n: [p] for n, p in self.named.items()}
        self.rates = LayerRates(len(self.groups), layer_rate) if layer_rate else None
        units = self.groups if self.rates else {"all": list(self.named.values())}
        self.optimizer = torch.optim.AdamW(adamw_groups(units, cfg.weight_decay), lr=cfg.lr,
                                           betas=betas)
        self.ema = EMA(model, cfg.ema_decay)
        self._layer: Stats = {}

    def train_step(self, step: int, lr: float) -> Stats:
        stats = self.rule.pretrain(self.model, self.batches) if step == 0 else {}
        self.set_lr(lr)
        batch = self.batches.next(step)
        grads, rule_stats = self.rule.grads(self.model, batch, step)
        if grads is not None:
            for name, p in self.named.items():
                p.grad = grads.get(name)
        stats.update({k: float(v) for k, v in rule_stats.items()})
        stepped = {n: live for n, ps in self.groups.items()
                   if (live := [p for p in ps if p.grad is not None])}
        if stepped:
            params = [p for ps in stepped.values() for p in ps]
            grad_sq = [p.grad.pow(2).sum() for p in params]  # type: ignore[union-attr]
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       self.cfg.grad_clip or math.inf)
            before = [p.detach().clone() for p in params]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model)
            stats.update(self._norms(stepped, grad_sq, before, grad_norm))
        self._layer = {k: stats.pop(k) for k in list(stats) if k.startswith(LAYER_PREFIXES)}
        return stats

    def set_lr(self, lr: float) -> None:
        gains = dict(zip(self.groups, self.rates.gains.tolist(), strict=True)) if self.rates else {}
        for group in self.optimizer.param_groups:
            group["lr"] = lr * gains.get(group["unit"], 1.0)

    def _norms(self, stepped: dict[str, list[nn.Parameter]], grad_sq: list[Tensor],
               before: list[Tensor], grad_norm: Tensor) -> Stats:
        """grad/, update/ per group and grad_norm; the relative updates feed the LR gains."""
        params = [p for ps in stepped.values() for p in ps]
        upd_sq = [(p.detach() - b).pow(2).sum() for p, b in zip(params, before, strict=True)]
        w_sq = [b.pow(2).sum() for b in before] if self.rates else []
        values = torch.stack([*grad_sq, *upd_sq, *w_sq, grad_norm]).tolist()  # one host sync
        n = len(params)
        out, rel, i = {"grad_norm": values[-1]}, [], 0
        for name, ps in stepped.items():
            j = i + len(ps)
            out[f"grad/{name}"] = math.sqrt(sum(values[i:j]))
            out[f"update/{name}"] = du = math.sqrt(sum(values[n + i:n + j]))
            if self.rates:
                rel.append(du / (math.sqrt(sum(values[2 * n + i:2 * n + j])) + 1e-12))
            i = j
        if self.rates:
            self.rates.update(rel)
            out.update({f"lr_gain/{name}": g
                        for name, g in zip(self.groups, self.rates.gains.tolist(), strict=True)})
        return out

    def layer_stats(self) -> Stats:
        return {**self._layer, **self.rule.log_stats(self.model)}

    def evaluate(self) -> Stats:
        return self._evaluate(self.ema.averaged(self.model))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "batches": self.batches.state_dict(),
                "rule": self.rule.state_dict(),
                "layer_rates": None if self.rates is None else self.rates.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.batches.load_state_dict(state["batches"])
        self.rule.load_state_dict(state["rule"])
        if self.rates is not None:
            self.rates.load_state_dict(state["layer_rates"])
