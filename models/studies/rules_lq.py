"""The ``rules-lq`` study: the toy linear-quadratic credit problem (log 002), whose exact costate
(models/ff/tasks/lq.py) lets the credit be scored directly: costate cosine, rho, nudge per layer.
Data are generated from the run seed (no prepare stage).
"""

from __future__ import annotations

from typing import Any

import torch

from models.config import Params
from models.config.ff import RulesLQConfig
from models.ff import metrics
from models.ff.mlp import DeepMLP
from models.ff.tasks.lq import exact_costate, lq_config, make_lq
from models.pipeline import RunSpec
from models.studies import baselines
from models.studies import ff_common as ff


class RulesLQStudy:
    name = "rules_lq"
    title = "rules-lq: toy linear-quadratic credit problem"
    columns = (("costate_cosine", "costate cosine"), ("rho", "rho"), ("nudge", "nudge"),
               ("gamma", "BP cosine (Gamma)"), ("test_loss", "test MSE"))
    plots = (("val_loss", "validation MSE"), ("loss", "training loss"))

    def _setup(self, params: Params, row: str, seed: int,
               device: torch.device) -> tuple[Any, DeepMLP, ff.Data]:
        cfg = params.study_as(self.name, RulesLQConfig)
        t, m = cfg.task, cfg.row_model(row)
        split = make_lq(t.d_in, t.d_out, n_train=t.n_train, n_test=t.n_test, noise=t.noise,
                        seed=seed)
        net = ff.make_net(seed, lambda: DeepMLP(lq_config(m.depth, m.d, t.d_in, t.d_out)),
                          device)
        return cfg.rules[row], net, ff.split_val(split, t.val_fraction).to(device)

    def calibrate(self, params: Params, row: str, device: torch.device) -> dict[str, Any]:
        cfg = params.study_as(self.name, RulesLQConfig)
        rule_cfg, net, data = self._setup(params, row, 0, device)
        # linear by construction: the head alone is already optimal, so it is only a floor
        refs = baselines.regression(net, data.x_fit, data.y_fit, data.x_test, data.y_test,
                                    baselines.Budget.of(cfg.row_train(row)), head_must_beat=False)
        rule = ff.build_rule(rule_cfg, net, 0, cfg.row_epochs(row))
        return {**ff.calibrate_rule(rule_cfg, rule, data.x_fit[:ff.CAL_BATCH],
                                    data.y_fit[:ff.CAL_BATCH]), "health": refs}

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      device: torch.device) -> ff.FFTrainer:
        cfg = params.study_as(self.name, RulesLQConfig)
        rule_cfg, net, data = self._setup(params, spec.row, spec.seed, device)
        return ff.make_trainer(rule_cfg, net, data, cfg.row_train(spec.row), spec.seed,
                               cfg.row_epochs(spec.row), calibration)

    def diagnose(self, params: Params, spec: RunSpec, trainer: ff.FFTrainer,
                 device: torch.device) -> dict[str, Any]:
        """On held-out test examples: costate cosine vs the exact adjoint, rho, nudge, Gamma."""
        out = {**trainer.test(), **trainer.evaluate()}
        d = trainer.data
        x, y = d.x_test[:ff.DIAG_BATCH], d.y_test[:ff.DIAG_BATCH]
        exact = exact_costate(trainer.net, x, y)  # type: ignore[arg-type]
        credit, credits = ff.credit_metrics(trainer.rule, x, y)
        out.update(credit)
        cc = metrics.costate_cosine(credits, exact)
        out.update({("costate_cosine" if k == "mean" else f"costate_cosine/{k}"): v
                    for k, v in cc.items()})
        names = trainer.net.layer_names()
        return {"metrics": out, "extras": ff.target_norms(names, credits)}
