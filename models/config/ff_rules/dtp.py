"""params.yaml schema of the ``dtp`` feed-forward rule
(its rule: ``models.ff.rules.dtp``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFDTPRule(RuleConfig):
    """Difference target propagation (models.ff.rules.dtp)."""

    kind: Literal["dtp"] = "dtp"
    eta: Annotated[float, Field(gt=0)] = 0.1  # top target step on the per-sample output gradient
    noise_std: Annotated[float, Field(gt=0)] = 0.1  # sigma of the inverse-training perturbation
    inverse_lr: Annotated[float, Field(gt=0)] = 1e-3  # Adam, internal
    inverse_steps: Annotated[int, Field(ge=1)] = 1  # inverse updates per training step
    pretrain_steps: Annotated[int, Field(ge=0)] = 200  # inverse pre-training before step 0
