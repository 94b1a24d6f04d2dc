"""The ``rules-vision`` study: MNIST-1D (offline default) or CIFAR-10 (user copy) classification
with a deep pre-LN MLP, one row per learning rule (EP trains the energy-based MLP instead).

Training evaluates on a validation part carved from the train split; the test split is read only
by ``diagnose`` (test accuracy, and the credit metrics on held-out examples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import Params
from models.config.ff import RulesVisionConfig
from models.context import RunContext
from models.ff.energy import EnergyMLP
from models.ff.mlp import DeepMLP
from models.ff.tasks import Split
from models.ff.tasks.cifar10 import load_cifar10
from models.pipeline import RunSpec
from models.studies import baselines
from models.studies import ff_common as ff
from models.studies.base import NO_RECORD, RunRecord
from models.training.trainer import Trainer


def load_split(cfg: RulesVisionConfig, path: Path) -> Split:
    """CIFAR-10 from the params' path (checksum-verified), else MNIST-1D from ``path`` (the
    prepared file, ``RunContext.mnist1d_file``)."""
    if cfg.task.dataset == "cifar10":
        return load_cifar10(str(cfg.task.cifar10_path), str(cfg.task.cifar10_sha256))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m stages.prepare --dataset "
                                f"mnist1d`")
    with np.load(path) as d:
        return Split(*(torch.from_numpy(d[k]) for k in ("x", "y", "x_test", "y_test")))


class RulesVisionStudy:
    name = "rules_vision"
    title = "rules-vision: deep MLP classification, BP vs backprop-free rules"
    columns = (("test_accuracy", "test acc"), ("test_loss", "test CE"),
               ("gamma", "BP cosine (Gamma)"), ("rho", "rho"), ("nudge", "nudge"),
               ("ms_per_step", "ms/step"))
    plots = (("val_accuracy", "validation accuracy"), ("loss", "training loss"))

    def _setup(self, params: Params, row: str, seed: int,
               ctx: RunContext) -> tuple[Any, torch.nn.Module, ff.Data]:
        cfg = params.study_as(self.name, RulesVisionConfig)
        rule_cfg, model = cfg.rules[row], cfg.row_model(row)
        device = ctx.device
        data = ff.split_val(load_split(cfg, ctx.mnist1d_file), cfg.task.val_fraction).to(device)
        d_in, d_out = data.x_fit.shape[1], int(data.y_fit.max()) + 1
        if ff.uses_energy_net(rule_cfg):
            net = ff.make_net(seed, lambda: EnergyMLP(ff.energy_config(model, d_in, d_out)),
                              device)
        else:
            net = ff.make_net(seed, lambda: DeepMLP(ff.mlp_config(model, d_in, d_out)), device)
        return rule_cfg, net, data

    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]:
        cfg = params.study_as(self.name, RulesVisionConfig)
        rule_cfg, net, data = self._setup(params, row, 0, ctx)
        refs = baselines.classification(net, data.x_fit, data.y_fit, data.x_test, data.y_test,
                                        baselines.Budget.of(cfg.row_train(row)))
        rule = ff.build_rule(rule_cfg, net, 0, cfg.row_epochs(row))
        return {**ff.calibrate_rule(rule_cfg, rule, data.x_fit[:ff.CAL_BATCH],
                                    data.y_fit[:ff.CAL_BATCH]), "health": refs}

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      ctx: RunContext) -> Trainer:
        cfg = params.study_as(self.name, RulesVisionConfig)
        rule_cfg, net, data = self._setup(params, spec.row, spec.seed, ctx)
        rule = ff.make_rule(rule_cfg, net, spec.seed, cfg.row_epochs(spec.row), calibration)
        return ff.make_trainer(rule_cfg, rule, data, cfg.row_train(spec.row), spec.seed)

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer,
                 ctx: RunContext, record: RunRecord = NO_RECORD) -> dict[str, Any]:
        """Test accuracy/CE on the held-out test split; Gamma, rho, nudge on test examples."""
        _, _, d = self._setup(params, spec.row, spec.seed, ctx)
        out = {**ff.held_out(trainer.model, d.x_test, d.y_test, "test"), **trainer.evaluate()}
        x, y = d.x_test[:ff.DIAG_BATCH], d.y_test[:ff.DIAG_BATCH]
        credit, credits = ff.credit_metrics(ff.ff_rule(trainer), x, y)
        out.update(credit)
        out["chance_accuracy"] = 1.0 / (int(d.y_fit.max()) + 1)
        names = trainer.model.layer_names()  # type: ignore[operator]
        return {"metrics": out, "extras": ff.target_norms(names, credits)}
