"""The two interfaces a study implements; the segment driver and the stages only see these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: the registry (models.studies) stays free of torch

    from models.config import Params
    from models.context import RunContext
    from models.paths import RunSpec


class Trainable(Protocol):
    """What the segment driver steps, evaluates and checkpoints: one run's complete trainable
    state and its step function (``models.training.trainer.Trainer``, or a composite of them such
    as the ladder's grid of cells).

    ``state_dict`` must hold everything a resumed segment needs to continue bit-identically except
    the global RNGs and the step, which the driver checkpoints itself: weights, optimizer, EMA,
    controller state, the rule's state, the data stream position.
    """

    def train_step(self, step: int, lr: float) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...

    def layer_stats(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunRecord:
    """What a run left besides its checkpoint, as the diagnose stage read it: the calibration
    and the segment logs (one dict per logged step, in order). A study's diagnosis takes them
    from here, never from a path of its own, so it can be called on any run's data."""

    calibration: dict[str, Any] = field(default_factory=dict)
    logs: list[dict[str, float]] = field(default_factory=list)


NO_RECORD = RunRecord()


class Study(Protocol):
    """What the stages call for one study. ``ctx`` carries the device and the prepared data
    (``models.context``): a study reads data through it alone, and the run's own calibration
    and logs through ``record``."""

    name: str
    title: str
    columns: tuple[tuple[str, str], ...]  # (metric key, label) of the result table, in order
    plots: tuple[tuple[str, str], ...]  # (logged key, label): one learning-curve figure each

    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]: ...

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      ctx: RunContext) -> Trainable: ...

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainable, ctx: RunContext,
                 record: RunRecord = NO_RECORD) -> dict[str, Any]: ...



# A report column: (metric key in diagnostics.json "metrics", column label).
Column = tuple[str, str]
