"""The ``eqt-lm`` study: language modelling on the token corpus, one row per learning rule.

Rows share data, tokenizer, evaluation windows and model shape (n_embd, n_head, block_size). A
row's ``kind`` names the module that builds, calibrates and diagnoses it (the registry's
``row_modules``, imported only for that row, so a run depends on the code of its own row alone):
``models.studies.eqt_lm.bp`` trains a standard pre-LN transformer, ``...equilibrium`` the
equilibrium LM of ``models.eqt`` with the gradient of the ``bptt`` or ``ep`` rule (METHODS §2).
Every row trains with the one trainer (``models.training.trainer``: AdamW, EMA, clipping,
statistics); this module wires data, row and evaluation and diagnoses what every row shares.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config import Params
from models.config.eqt import LMStudyConfig, RelaxConfig
from models.context import RunContext
from models.nets.transformer import attention_off
from models.paths import RunSpec
from models.studies import STUDIES
from models.studies.base import NO_RECORD, RunRecord
from models.studies.eqt_lm.common import EVAL_SEED, val_loss
from models.training import rng
from models.training.trainer import Trainer
from models.training.windows import Windows


def row_module(kind: str) -> ModuleType:
    """The module of a row kind (``models.studies.STUDIES``: the registry the identity reads)."""
    return importlib.import_module(STUDIES["eqt_lm"].row_modules[kind])


def build(study: LMStudyConfig, row: str, seed: int, relax: RelaxConfig | None,
          ctx: RunContext) -> Trainer:
    """A row's model and rule (from its kind's module, the equilibrium LM under the calibrated
    ``relax``, else the row's own), its training windows and its evaluation."""
    rule_cfg = study.rules[row]
    model_cfg, train_cfg = study.row_model(row), study.row_train(row)
    device, tokens = ctx.device, ctx.tokens
    rng.seed_everything(seed)
    model, rule, loss_of = row_module(rule_cfg.kind).build(model_cfg, rule_cfg, relax,
                                                           tokens.vocab_size, device)
    batches = Windows(tokens.train, model_cfg.block_size, train_cfg.batch_size, seed, device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_loss": val_loss(loss_of(m), tokens.val, model_cfg.block_size, train_cfg,
                                     train_cfg.eval_batches, device)}

    return Trainer(model, rule, batches, evaluate, train_cfg)


class EqtLMStudy:
    name = "eqt_lm"
    title = "eqt-lm: language modelling, BP transformer vs equilibrium propagation"
    columns = (("best_val_loss", "best val CE"), ("final_val_loss", "final val CE"),
               ("steps", "steps"), ("context_gain", "CE gain from attention"), ("residual", "final residual"),
               ("cos_bptt", "cos to BPTT"), ("cos_implicit", "cos to implicit"),
               ("ms_per_step", "ms/step"), ("peak_mem_mb", "peak MB"))
    plots = (("val_loss", "validation cross-entropy"), ("loss", "training loss"),
             ("cos/global", "cos(g_rule, g_BPTT) during training"))

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      ctx: RunContext) -> Trainer:
        relax = RelaxConfig(**calibration["relax"]) if "relax" in calibration else None
        return build(params.study_as(spec.study, LMStudyConfig), spec.row, spec.seed, relax,
                     ctx)

    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]:
        """The row module's calibration of an untrained run (``bp`` or ``equilibrium``)."""
        study = params.study_as(self.name, LMStudyConfig)
        trainer = build(study, row, 0, None, ctx)
        return row_module(study.rules[row].kind).calibrate(trainer, ctx, self.name)

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer,
                 ctx: RunContext, record: RunRecord = NO_RECORD) -> dict[str, Any]:
        """Held-out CE on more windows than during training, entropy, samples, and the CE with
        attention off (``val_loss_no_attention``; ``context_gain`` = it minus the CE on the same
        windows: what context adds, ~0 for a model that predicts from the current token alone);
        for equilibrium rows also the gradient-quality and operator diagnostics of METHODS §2."""
        device, codec = ctx.device, ctx.tokens.codec
        model = trainer.ema.averaged(trainer.model).eval()
        stream = Windows(ctx.tokens.val, model.shape.block_size, trainer.cfg.batch_size,  # type: ignore[arg-type]
                         EVAL_SEED + 1, device)
        ce, ent, held_out = [], [], [stream.next() for _ in range(2 * trainer.cfg.eval_batches)]
        with torch.no_grad():
            for x, y in held_out:
                logits = model(x)
                ce.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
                logp = logits.log_softmax(-1)
                ent.append(-(logp.exp() * logp).sum(-1).mean().item())
            # what the model predicts without context: attention off (the equilibrium relaxed
            # again without it) on the first half of the same windows
            with attention_off(model):
                ce_off = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                          for x, y in held_out[:trainer.cfg.eval_batches]]
            ce_on = float(np.mean(ce[:trainer.cfg.eval_batches]))
            samples = [codec.decode(sample(model, codec.encode(prompt), 80, device, seed=i))
                       for i, prompt in enumerate(["Once upon a time", "Question: How many"])]
        model.train()
        result: dict[str, Any] = {
            "metrics": {"val_loss": float(np.mean(ce)), "pred_entropy": float(np.mean(ent)),
                        "ln_vocab": math.log(codec.vocab_size),
                        "val_loss_no_attention": float(np.mean(ce_off)),
                        "context_gain": float(np.mean(ce_off)) - ce_on},
            "samples": samples, "extras": {"vocab_size": codec.vocab_size}}
        kind = params.study_as(self.name, LMStudyConfig).rules[spec.row].kind
        row_module(kind).diagnose(trainer, ctx, result)
        return result


def sample(model: torch.nn.Module, prompt: list[int], n: int, device: torch.device,
           seed: int, temperature: float = 0.8) -> list[int]:
    """Ancestral sampling with a private generator (leaves the global RNG alone)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    block = model.shape.block_size
    for _ in range(n):
        logits = model(ids[:, -block:])[:, -1] / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0].tolist()
