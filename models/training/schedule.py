"""Learning-rate schedule: linear warm-up, cosine decay over ``decay_steps``, then flat at min_lr.

It deliberately ignores the run's total ``steps``: extending a run must not change the LR of the
steps already trained, or finished segments could not be reused.
"""

from __future__ import annotations

import math

from models.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
