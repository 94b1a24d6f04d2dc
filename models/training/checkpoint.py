"""Segment checkpoints: one file per finished segment, valid only for the config that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models import io

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or made by another config)."""


def save(path: Path, *, step: int, fingerprint: str, trainer: dict[str, Any],
         rng: dict[str, Any], config: dict[str, Any] | None = None) -> None:
    """``config`` is the resolved run config training used (for train/eval drift checks)."""
    io.torch_save(path, {"format": FORMAT, "step": step, "fingerprint": fingerprint,
                         "trainer": trainer, "rng": rng, "config": config})


def load(path: Path, *, fingerprint: str, step: int) -> dict[str, Any]:
    """Load a checkpoint and check it is the one this run expects at ``step``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the previous segment first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {payload.get('format')} != {FORMAT}")
    if payload["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path}: made with training config {payload['fingerprint']}, "
                              f"current is {fingerprint}; retrain from segment 0")
    if payload["step"] != step:
        raise CheckpointError(f"{path}: ends at step {payload['step']}, expected {step}")
    return payload


def is_valid(path: Path, *, fingerprint: str, step: int) -> bool:
    try:
        load(path, fingerprint=fingerprint, step=step)
    except CheckpointError:
        return False
    return True
