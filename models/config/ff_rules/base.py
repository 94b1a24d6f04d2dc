"""What every feed-forward rule's config has: the row's overrides of the study's train and model
config and its own epochs; the network family it trains."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from models.config.base import Strict


class RuleConfig(Strict):
    train: dict[str, Any] = {}  # per-row overrides of the study's train / model
    model: dict[str, Any] = {}
    epochs: Annotated[int, Field(gt=0)] | None = None  # None: the study's epochs (equal budgets)

    def uses_energy_net(self) -> bool:
        """Whether the row trains the energy-based MLP (``models.ff.energy``) instead of the
        pre-LN MLP: EP and its head-only baseline do."""
        return False
