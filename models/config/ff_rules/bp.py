"""params.yaml schema of the ``bp`` feed-forward rule
(its rule: ``models.ff.rules.bp``)."""

from __future__ import annotations

from typing import Literal

from models.config.ff_rules.base import RuleConfig


class FFBPRule(RuleConfig):
    """Back-propagation (models.ff.rules.bp)."""

    kind: Literal["bp"] = "bp"
