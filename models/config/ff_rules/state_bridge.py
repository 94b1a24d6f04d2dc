"""params.yaml schema of the ``state_bridge`` feed-forward rule
(its rule: ``models.ff.rules.state_bridge``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from models.config.ff_rules.base import RuleConfig


class FFStateBridgeRule(RuleConfig):
    """State bridge (models.ff.rules.state_bridge)."""

    kind: Literal["state_bridge"] = "state_bridge"
    bridge_lr: Annotated[float, Field(gt=0)] = 1e-3  # Adam, internal
