"""The feed-forward rules' config classes, one torch-free module per rule kind:
``models/config/ff_rules/<kind>.py`` holds the class whose ``kind`` is ``<kind>`` (its rule:
``models/ff/rules/<kind>.py``). They are found by listing this package, so adding a rule edits no
existing file, and a run's identity holds its own rule's config module alone."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from models.config.ff_rules.base import RuleConfig

KINDS: tuple[str, ...] = tuple(sorted(
    p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "base")))


def _config_class(kind: str) -> type[RuleConfig]:
    module = importlib.import_module(f"{__name__}.{kind}")
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, RuleConfig) and v is not RuleConfig
             and v.model_fields.get("kind") is not None and v.model_fields["kind"].default == kind]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define one RuleConfig subclass with kind {kind!r}")
    return found[0]


RULE_CONFIGS: dict[str, type[RuleConfig]] = {k: _config_class(k) for k in KINDS}
# a row's rule: the config class its ``kind`` names
FFRule = Annotated[Union[tuple(RULE_CONFIGS.values())], Field(discriminator="kind")]  # noqa: UP007

__all__ = ["KINDS", "RULE_CONFIGS", "FFRule", "RuleConfig"]
