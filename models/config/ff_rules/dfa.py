"""params.yaml schema of the ``dfa`` feed-forward rule
(its rule: ``models.ff.rules.dfa``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFDFARule(RuleConfig):
    """Direct feedback alignment (models.ff.rules.dfa)."""

    kind: Literal["dfa"] = "dfa"
    # "calibrated": RMS of the credit matched to BP's dL/dh_l at initialisation (calibrate stage)
    feedback_scale: Annotated[float, Field(gt=0)] | Literal["calibrated"] = "calibrated"
    # shared: one B for the residual stream (Launay et al. 2020); per_layer: B_l per layer
    # (Nokland 2016). models/ff/rules/dfa.py says why shared is the default.
    feedback: Literal["shared", "per_layer"] = "shared"
