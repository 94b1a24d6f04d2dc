"""Optimisation and bookkeeping of one run (shared by every study)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from models.config.base import Strict


class TrainConfig(Strict):
    """The LR schedule never depends on ``steps``, so raising ``steps`` extends a run without
    invalidating the segments already trained."""

    batch_size: Annotated[int, Field(gt=0)] = 32
    steps: Annotated[int, Field(gt=0)] = 800
    segment_steps: Annotated[int, Field(gt=0)] = 200
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr: Annotated[float, Field(ge=0)] = 3e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    decay_steps: Annotated[int, Field(gt=0)] = 800
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    log_every: Annotated[int, Field(gt=0)] = 20
    eval_every: Annotated[int, Field(gt=0)] = 200
    eval_batches: Annotated[int, Field(gt=0)] = 16
    live_guard: bool = False

    # What may change without invalidating trained segments (see models.pipeline.identity).
    EVAL_ONLY: ClassVar[tuple[str, ...]] = ("steps", "eval_every", "eval_batches", "log_every", "live_guard")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        return self

    @property
    def n_segments(self) -> int:
        return -(-self.steps // self.segment_steps)

    def segment_end(self, index: int) -> int:
        return min((index + 1) * self.segment_steps, self.steps)
