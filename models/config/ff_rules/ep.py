"""params.yaml schema of the ``ep`` feed-forward rule
(its rule: ``models.ff.rules.ep``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFEPRule(RuleConfig):
    """Equilibrium propagation on the energy net (models.ff.rules.ep)."""

    kind: Literal["ep"] = "ep"
    beta: Annotated[float, Field(gt=0)] = 0.5  # centered nudging (Laborieux et al. 2021)
    nudge_steps: Annotated[int, Field(ge=1)] = 20

    def uses_energy_net(self) -> bool:
        return True
