"""The study config most studies share: ``rows`` of ``rules``, study-wide ``train`` and ``model``
defaults, and each rule's ``train`` / ``model`` overrides merged over them (validated once, at
load, with the key named in any error)."""

from __future__ import annotations

from typing import Any

from models.config.base import StudyConfig, check_rows, merge_checked
from models.config.train import TrainConfig


class RowStudyConfig(StudyConfig):
    """Subclasses declare ``model`` and ``rules`` (each rule with ``train`` and ``model`` dicts)
    and call ``_check`` from their validator."""

    train: TrainConfig = TrainConfig()

    def _check(self) -> None:
        check_rows(self.rows, self.rules)  # type: ignore[attr-defined]
        for name in self.rules:  # type: ignore[attr-defined]
            self.row_train(name)
            self.row_model(name)

    def row_train(self, row: str) -> TrainConfig:
        return merge_checked(self.train, self.rules[row].train, f"rules.{row}.train")  # type: ignore[attr-defined]

    def row_model(self, row: str) -> Any:
        return merge_checked(self.model, self.rules[row].model, f"rules.{row}.model")  # type: ignore[attr-defined]

    def row_rule(self, row: str) -> Any:
        return self.rules[row]  # type: ignore[attr-defined]
