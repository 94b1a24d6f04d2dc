"""The ``bp`` row of ``eqt_lm``: a standard pre-LN transformer trained by backprop
(``models.nets.transformer``), the baseline every equilibrium row is judged against.

A row module of the study gives three calls: ``build`` (model, learning rule, held-out loss),
``calibrate`` and ``diagnose`` (what the row adds to the study's common diagnosis).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config.eqt import BPRule, LMModelConfig, RelaxConfig
from models.context import RunContext
from models.nets.transformer import TransformerLM, TransformerShape
from models.studies.eqt_lm.common import LossFn, check_init_loss, lm_baselines, val_loss
from models.training.trainer import Backprop, Trainer


def lm_objective(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The BP row's loss: next-token CE of the transformer, and the RMS of its residual stream
    after the embedding and after every block."""
    assert isinstance(model, TransformerLM)
    x, y = batch
    states = model.hidden_states(x)
    loss = F.cross_entropy(model.head(model.ln_f(states[-1])).flatten(0, 1), y.flatten())
    act = {f"act/h{i}": s.detach().pow(2).mean().sqrt().item() for i, s in enumerate(states)}
    return loss, {"loss": loss.item(), "term/ce": loss.item(), **act}


def transformer_loss(model: nn.Module) -> LossFn:
    return lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def build(model_cfg: LMModelConfig, rule_cfg: BPRule, relax: RelaxConfig | None,
          vocab_size: int, device: torch.device) -> tuple[nn.Module, Backprop, LossFn]:
    """The transformer at the row's shape, its rule and its held-out loss (``relax``: unused)."""
    model = TransformerLM(TransformerShape(
        vocab_size=vocab_size, block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
        n_head=model_cfg.n_head, n_layer=model_cfg.n_layer, qk_norm=model_cfg.qk_norm,
    )).to(device)
    return model, Backprop(lm_objective), transformer_loss  # type: ignore[return-value]


def calibrate(trainer: Trainer, ctx: RunContext, study_name: str) -> dict[str, Any]:
    """Initial loss vs ln V, activation RMS after every block, a short LR probe."""
    train_cfg = trainer.cfg
    ln_v = math.log(ctx.tokens.vocab_size)
    block = trainer.model.shape.block_size  # type: ignore[union-attr]
    init_loss = val_loss(transformer_loss(trainer.model), ctx.tokens.val, block, train_cfg, 4,
                         ctx.device)
    x, _ = trainer.batches.next(0)
    with torch.no_grad():
        act = [s.pow(2).mean().sqrt().item() for s in trainer.model.hidden_states(x)]  # type: ignore[operator]
    probe_steps = 20
    losses = [trainer.train_step(s, train_cfg.lr)["loss"] for s in range(probe_steps)]
    result = {
        "ln_vocab": ln_v, "init_val_loss": init_loss, "init_over_ln_vocab": init_loss / ln_v,
        "act_rms": act, "lr_probe": {"lr": train_cfg.lr, "steps": probe_steps,
                                     "first_loss": losses[0], "last_loss": losses[-1]},
        "health": lm_baselines(ctx.tokens, init_loss),
    }
    check_init_loss(init_loss, ln_v)
    if not math.isfinite(losses[-1]) or losses[-1] > losses[0]:
        raise ValueError(f"calibration: loss rose from {losses[0]:.3f} to {losses[-1]:.3f} in "
                         f"{probe_steps} steps at lr={train_cfg.lr}; lower "
                         f"studies.{study_name}.train.lr")
    return result


def diagnose(trainer: Trainer, ctx: RunContext, result: dict[str, Any]) -> None:
    """Nothing beyond the study's common diagnosis."""
