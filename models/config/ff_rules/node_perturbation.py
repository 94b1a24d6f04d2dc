"""params.yaml schema of the ``node_perturbation`` feed-forward rule
(its rule: ``models.ff.rules.node_perturbation``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFNodePerturbationRule(RuleConfig):
    """Node perturbation (models.ff.rules.node_perturbation)."""

    kind: Literal["node_perturbation"] = "node_perturbation"
    sigma: Annotated[float, Field(gt=0)] = 1e-3  # perturbation size (central difference: O(sigma^2))
    directions: Annotated[int, Field(ge=1)] = 1  # random directions averaged per step and layer
