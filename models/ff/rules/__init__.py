"""Feed-forward learning rules, one module per rule: ``models/ff/rules/<kind>.py`` holds the
``Rule`` subclass whose ``name`` is ``<kind>`` (its config class, ``models.config.ff``, has the
same ``kind``). ``build(cfg, net, seed, epochs)`` imports the module of ``cfg.kind`` only, so a
run's code identity (``models.identity``) holds its own rule's module and no other, and adding a
rule is a new module here plus its config class: no registry to edit."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from models.ff.rules.base import Rule

KINDS: tuple[str, ...] = tuple(sorted(
    p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "base")))


def rule_class(kind: str) -> type[Rule]:
    """The ``Rule`` subclass of ``kind``, from its own module."""
    if kind not in KINDS:
        raise KeyError(f"unknown feed-forward rule {kind!r}; known: {list(KINDS)}")
    module = importlib.import_module(f"{__name__}.{kind}")
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Rule) and getattr(v, "name", None) == kind]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define one Rule subclass with name = {kind!r}")
    return found[0]


def build(cfg: Any, net: nn.Module, seed: int, epochs: int) -> Rule:
    """The rule of a params row on ``net``: its config as it is, the run's seed and epochs."""
    return rule_class(cfg.kind).from_config(net, cfg, seed, epochs)


__all__ = ["KINDS", "Rule", "build", "rule_class"]
