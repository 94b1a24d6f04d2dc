"""params.yaml schema of the ``head_only`` feed-forward rule
(its rule: ``models.ff.rules.head_only``)."""

from __future__ import annotations

from typing import Literal

from models.config.ff_rules.base import RuleConfig


class FFHeadOnlyRule(RuleConfig):
    """Hidden layers frozen at init, only the readout learns (models.ff.rules.head_only): the
    baseline each rule must beat on its own network family (``energy``: EP's energy net)."""

    kind: Literal["head_only"] = "head_only"
    net: Literal["mlp", "energy"] = "mlp"

    def uses_energy_net(self) -> bool:
        return self.net == "energy"
