"""params.yaml schema of the ``credit_bridge`` feed-forward rule
(its rule: ``models.ff.rules.credit_bridge``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFCreditBridgeRule(RuleConfig):
    """Credit bridge (models.ff.rules.credit_bridge)."""

    kind: Literal["credit_bridge"] = "credit_bridge"
    # Adam, internal, value head and bridges: 10x the net's lr so V tracks the moving net
    bridge_lr: Annotated[float, Field(gt=0)] = 1e-2
    d_value: Annotated[int, Field(gt=0)] = 256
    term_grad_weight: Annotated[float, Field(ge=0)] = 1.0
    warmup_frac: Annotated[float, Field(ge=0, le=1)] = 0.2  # DFA warm-up, fraction of epochs
    feedback_scale: Annotated[float, Field(gt=0)] | Literal["calibrated"] = "calibrated"
