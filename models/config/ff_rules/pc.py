"""params.yaml schema of the ``pc`` feed-forward rule
(its rule: ``models.ff.rules.pc``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from models.config.ff_rules.base import RuleConfig


class FFPCRule(RuleConfig):
    """Predictive coding with a clamped output (models.ff.rules.pc, which says why)."""

    kind: Literal["pc"] = "pc"
    settle_lr: Annotated[float, Field(gt=0)] = 0.2  # gamma (over max precision)
    settle_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # heavy ball
    settle_iters: Annotated[int, Field(ge=1)] = 100  # cap
    settle_tol: Annotated[float, Field(gt=0, lt=1)] = 2e-2  # fraction of the initial force left
    precision_init: Annotated[float, Field(gt=0)] = 1.0
    precision_floor: Annotated[float, Field(gt=0)] = 0.1
    precision_lr: Annotated[float, Field(ge=0)] = 1e-2  # SGD on r; 0 freezes the precisions
    precision_prior_rate: Annotated[float, Field(gt=0)] = 0.1  # b: stable point near 1 / (2b)
    precision_damping: Annotated[float, Field(ge=0)] = 1.0  # kappa
    precision_ema: Annotated[float, Field(ge=0, lt=1)] = 0.99
    noise_std: Annotated[float, Field(ge=0)] = 0.0
    noise_anneal: Annotated[float, Field(gt=0, le=1)] = 0.9  # per-epoch factor on the noise
    output_weight: Annotated[float, Field(gt=0, le=1)] = 1.0  # 1 = clamped; < 1 tests only
    calibrate_settle: bool = True  # replace settle_lr by the calibrated one

    @model_validator(mode="after")
    def _floor(self) -> FFPCRule:
        if self.precision_init <= self.precision_floor:
            raise ValueError("precision_init must exceed precision_floor")
        return self
