"""Segment checkpoints: one file per finished segment, valid only for the run identity that made it.

A run's identity (``models.pipeline.run_identity``) is a small dict of hashes: the resolved
training config, the source of every module training imports, the calibration file and the
data. A checkpoint records it; resuming needs every part to match, and the error names the parts
that changed, so "why did this retrain?" has an answer.

Next to each ``segNNNN.pt`` a small ``segNNNN.json`` (format, step, identity) is written after it,
so deciding which segments of a run are still valid reads a few hundred bytes per segment instead
of loading every checkpoint (a missing sidecar falls back to the checkpoint itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models import io
from models.errors import CheckpointError

FORMAT = 3  # 3: the one trainer's state (model, optimizer, ema, batches, rule, layer_rates)


def save(path: Path, *, step: int, identity: dict[str, str], trainer: dict[str, Any],
         rng: dict[str, Any], config: dict[str, Any] | None = None) -> None:
    """``config`` is the resolved run config training used (for train/eval drift checks)."""
    io.torch_save(path, {"format": FORMAT, "step": step, "identity": identity,
                         "trainer": trainer, "rng": rng, "config": config})
    io.write_json(sidecar(path), {"format": FORMAT, "step": step, "identity": identity})


def sidecar(path: Path) -> Path:
    """seg0003.pt -> seg0003.json: the checkpoint's identity, readable without loading it."""
    return path.with_suffix(".json")


def load(path: Path, *, identity: dict[str, str] | None, step: int) -> dict[str, Any]:
    """Load a checkpoint and check it is the one this run expects at ``step``.

    ``identity=None`` skips the identity check (diagnosing a run directory brought from another
    machine, where the code or data paths may differ); the step is always checked.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the previous segment first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {payload.get('format')} != {FORMAT}; "
                              "retrain from segment 0")
    if identity is not None and payload["identity"] != identity:
        diff = changed(payload["identity"], identity)
        raise CheckpointError(f"{path}: made by another run identity ({diff}); retrain from "
                              "segment 0")
    if payload["step"] != step:
        raise CheckpointError(f"{path}: ends at step {payload['step']}, expected {step}")
    return payload


def changed(old: dict[str, str], new: dict[str, str]) -> str:
    """'code, calibration changed' — which parts of an identity differ."""
    parts = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(parts) + " changed"


def is_valid(path: Path, *, identity: dict[str, str], step: int) -> bool:
    """Whether ``path`` is this run's checkpoint at ``step`` (from its sidecar when it has one)."""
    side = sidecar(path)
    if path.is_file() and side.is_file():
        try:
            meta = io.read_json(side)
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            return (meta.get("format") == FORMAT and meta.get("step") == step
                    and meta.get("identity") == identity)
    try:
        load(path, identity=identity, step=step)
    except CheckpointError:
        return False
    return True
