"""The ``rules-lq`` study: the toy linear-quadratic credit problem (log 002), whose exact costate
(models/ff/tasks/lq.py) lets the credit be scored directly: costate cosine, rho, nudge per layer.
Data are generated from the run seed (no prepare stage).

With ``task.system: fixed`` (the default, the log's framing) the linear system is never trained:
only the rule's estimators learn (``ff.FFRule`` with ``train_net`` off: bridges, value nets), so
the costate stays a real signal and DFA, whose feedback is never aligned by training, scores ~0;
training logs the system's batch ``loss`` and evaluates the costate cosine on the validation
split. ``co_trained`` trains the system with the rule too and is labelled so in the title.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.config import Params
from models.config.ff import RulesLQConfig
from models.context import RunContext
from models.ff import metrics
from models.ff.mlp import DeepMLP
from models.ff.rules import Rule
from models.ff.tasks.lq import exact_costate, lq_config, make_lq
from models.pipeline import RunSpec
from models.studies import baselines
from models.studies import ff_common as ff
from models.studies.base import NO_RECORD, RunRecord
from models.training.trainer import Trainer


def costate_cosine(rule: Rule, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean costate cosine of the rule's credit on (x, y): how far the estimators got."""
    return metrics.costate_cosine(rule.credit(x, y), exact_costate(net, x, y))["mean"]  # type: ignore[arg-type]


class RulesLQStudy:
    name = "rules_lq"
    title = ("rules-lq: toy linear-quadratic credit problem (system fixed while the estimators "
             "learn, unless task.system = co_trained)")
    columns = (("costate_cosine", "costate cosine"), ("rho", "rho"), ("nudge", "nudge"),
               ("gamma", "BP cosine (Gamma)"), ("test_loss", "test MSE"))
    plots = (("val_costate_cosine", "validation costate cosine (fixed system)"),
             ("loss", "training loss"))

    def _setup(self, params: Params, row: str, seed: int,
               device: torch.device) -> tuple[Any, DeepMLP, ff.Data]:
        cfg = params.study_as(self.name, RulesLQConfig)
        t, m = cfg.task, cfg.row_model(row)
        split = make_lq(t.d_in, t.d_out, n_train=t.n_train, n_test=t.n_test, noise=t.noise,
                        seed=seed)
        net = ff.make_net(seed, lambda: DeepMLP(lq_config(m.depth, m.d, t.d_in, t.d_out)),
                          device)
        return cfg.rules[row], net, ff.split_val(split, t.val_fraction).to(device)

    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]:
        cfg = params.study_as(self.name, RulesLQConfig)
        rule_cfg, net, data = self._setup(params, row, 0, ctx.device)
        if cfg.task.system == "fixed":  # nothing to beat on the loss: the system is not trained
            refs: dict[str, Any] = {"baselines": []}
        else:  # linear by construction: the head alone is already optimal, only a floor
            refs = baselines.regression(net, data.x_fit, data.y_fit, data.x_test, data.y_test,
                                        baselines.Budget.of(cfg.row_train(row)),
                                        head_must_beat=False)
        rule = ff.build_rule(rule_cfg, net, 0, cfg.row_epochs(row))
        return {**ff.calibrate_rule(rule_cfg, rule, data.x_fit[:ff.CAL_BATCH],
                                    data.y_fit[:ff.CAL_BATCH]), "health": refs}

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      ctx: RunContext) -> Trainer:
        cfg = params.study_as(self.name, RulesLQConfig)
        rule_cfg, net, data = self._setup(params, spec.row, spec.seed, ctx.device)
        rule = ff.make_rule(rule_cfg, net, spec.seed, cfg.row_epochs(spec.row), calibration)
        fixed = cfg.task.system == "fixed"
        x, y = data.x_val[:ff.DIAG_BATCH], data.y_val[:ff.DIAG_BATCH]
        return ff.make_trainer(
            rule_cfg, rule, data, cfg.row_train(spec.row), spec.seed, train_net=not fixed,
            evaluate=(lambda m: {"val_costate_cosine": costate_cosine(rule, m, x, y)})
            if fixed else None)

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer,
                 ctx: RunContext, record: RunRecord = NO_RECORD) -> dict[str, Any]:
        """On held-out test examples: costate cosine vs the exact adjoint, rho, nudge, Gamma."""
        _, _, d = self._setup(params, spec.row, spec.seed, ctx.device)
        net = trainer.model
        out = {**ff.held_out(net, d.x_test, d.y_test, "test"),
               **ff.held_out(net, d.x_val, d.y_val, "val"), **trainer.evaluate()}
        x, y = d.x_test[:ff.DIAG_BATCH], d.y_test[:ff.DIAG_BATCH]
        exact = exact_costate(net, x, y)  # type: ignore[arg-type]
        credit, credits = ff.credit_metrics(ff.ff_rule(trainer), x, y)
        out.update(credit)
        cc = metrics.costate_cosine(credits, exact)
        out.update({("costate_cosine" if k == "mean" else f"costate_cosine/{k}"): v
                    for k, v in cc.items()})
        names = net.layer_names()  # type: ignore[operator]
        return {"metrics": out, "extras": ff.target_norms(names, credits)}
