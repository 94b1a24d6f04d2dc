"""Train/eval configuration drift: two resolved config dicts (prompt templates included)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from models.health.finding import Finding, Severity

# Keys that legitimately differ between training and evaluation (matched on dotted key and leaf).
# device/threads say where a run is computed, not what (a GPU run diagnosed on a laptop is no
# drift); live_guard only decides whether a segment may be stopped early.
DEFAULT_IGNORE = ("*seed", "*batch_size", "*dropout*", "*steps", "*shuffle", "device", "threads",
                  "*live_guard")


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"prompt": {"primer": x}}`` -> ``{"prompt.primer": x}``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, full + ".")
        else:
            out[full] = value
    return out


def config_drift(train: Mapping[str, Any], evaluation: Mapping[str, Any], *,
                 ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Finding]:
    """Keys present in both configs with different values (log 004: train primer 'Answer: ',
    eval primer 'Analysis of received thought vector: '). Strings (prompts, templates) are
    errors, other values warnings; keys on one side only are info."""
    a, b = flatten(train), flatten(evaluation)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(fnmatch.fnmatch(key, pat) for pat in ignore):
            continue
        if key in a and key in b:
            if a[key] == b[key]:
                continue
            text = isinstance(a[key], str) or isinstance(b[key], str)
            out.append(Finding(
                detector="config_drift",
                severity=Severity.ERROR if text else Severity.WARNING,
                message=f"train/eval differ at {key}: train {a[key]!r} vs eval {b[key]!r}",
                where=f"config key {key} in the training and evaluation configs",
                evidence={}))
        else:
            side = "train" if key in a else "eval"
            out.append(Finding(
                detector="config_drift", severity=Severity.INFO,
                message=f"{key} is set only in the {side} config ({(a | b)[key]!r})",
                where=f"config key {key}", evidence={}))
    return out
