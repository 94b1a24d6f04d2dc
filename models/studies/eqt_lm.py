"""The ``eqt-lm`` study: language modelling on the token corpus, one row per learning rule.

Rows share data, tokenizer, evaluation windows and model width; the BP row trains a standard pre-LN
transformer (``models.nets.transformer``) of the shape the equilibrium block matches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import io
from models.config import LMModelConfig, Params, TrainConfig
from models.data.tokens import TokenStream, load_codec, read_tokens
from models.nets.transformer import TransformerLM, TransformerShape
from models.pipeline import RunSpec, tokens_dir
from models.training import rng
from models.training.ema import EMA

EVAL_SEED = 10_000  # the same validation windows for every row and seed


def vocab_size() -> int:
    return int(io.read_json(tokens_dir() / "meta.json")["vocab_size"])


class BPTransformerTrainer:
    """AdamW on a TransformerLM; the BP baseline row."""

    def __init__(self, model_cfg: LMModelConfig, train_cfg: TrainConfig, seed: int,
                 device: torch.device) -> None:
        rng.seed_everything(seed)
        self.device = device
        self.cfg = train_cfg
        self.model = TransformerLM(TransformerShape(
            vocab_size=vocab_size(), block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
            n_head=model_cfg.n_head, n_layer=model_cfg.n_layer, qk_norm=model_cfg.qk_norm,
        )).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr, betas=(0.9, 0.95))
        self.ema = EMA(self.model, train_cfg.ema_decay)
        self.stream = TokenStream(read_tokens(tokens_dir() / "train.bin"), model_cfg.block_size,
                                  train_cfg.batch_size, seed)
        self.val = read_tokens(tokens_dir() / "val.bin")
        self._last: dict[str, float] = {}

    def train_step(self, step: int, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.stream.next_batch(self.device)
        states = self.model.hidden_states(x)
        logits = self.model.head(self.model.ln_f(states[-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.cfg.grad_clip or float("inf"))
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.optimizer.step()
        self.ema.update(self.model)
        self._last = {f"act/h{i}": s.detach().pow(2).mean().sqrt().item()
                      for i, s in enumerate(states)}
        self._last.update(_param_stats(self.model, before))
        return {"loss": loss.item(), "term/ce": loss.item(), "grad_norm": grad_norm.item()}

    def layer_stats(self) -> dict[str, float]:
        return dict(self._last)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"val_loss": self.val_loss(self.cfg.eval_batches)}

    @torch.no_grad()
    def val_loss(self, batches: int) -> float:
        model = self.ema.averaged(self.model)
        model.eval()
        stream = TokenStream(self.val, model.shape.block_size, self.cfg.batch_size, EVAL_SEED)
        losses = []
        for _ in range(batches):
            x, y = stream.next_batch(self.device)
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
        model.train()
        return float(np.mean(losses))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.stream.load_state_dict(state["stream"])


def _param_stats(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient and update norms per parameter tensor (cheap; read by the health checks)."""
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad/{name}"] = p.grad.norm().item()
        out[f"update/{name}"] = (p.detach() - before[name]).norm().item()
    return out


class EqtLMStudy:
    name = "eqt_lm"
    title = "eqt-lm: language modelling, BP transformer vs equilibrium propagation"
    datasets = ("tokens",)
    columns = (("best_val_loss", "best val CE"), ("final_val_loss", "final val CE"),
               ("ms_per_step", "ms/step"), ("peak_mem_mb", "peak MB"))
    plots = (("val_loss", "validation cross-entropy"), ("loss", "training loss"))

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      device: torch.device) -> BPTransformerTrainer:
        study = params.study(spec.study)
        return BPTransformerTrainer(study.row_model(spec.row), study.row_train(spec.row),
                                    spec.seed, device)

    def calibrate(self, params: Params, row: str, device: torch.device) -> dict[str, Any]:
        """Initial loss vs ln V, activation RMS per layer, and a short LR probe."""
        study = params.study(self.name)
        train_cfg = study.row_train(row)
        trainer = BPTransformerTrainer(study.row_model(row), train_cfg, seed=0, device=device)
        ln_v = math.log(vocab_size())
        init_loss = trainer.val_loss(4)
        x, _ = trainer.stream.next_batch(device)
        with torch.no_grad():
            act = [s.pow(2).mean().sqrt().item() for s in trainer.model.hidden_states(x)]
        probe_steps = 20
        losses = [trainer.train_step(s, train_cfg.lr)["loss"] for s in range(probe_steps)]
        result = {
            "ln_vocab": ln_v, "init_val_loss": init_loss, "init_over_ln_vocab": init_loss / ln_v,
            "act_rms": act, "lr_probe": {"lr": train_cfg.lr, "steps": probe_steps,
                                         "first_loss": losses[0], "last_loss": losses[-1]},
        }
        if abs(init_loss / ln_v - 1) > 0.1:
            raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                             f"ln V = {ln_v:.3f}; the initialisation is off")
        if not math.isfinite(losses[-1]) or losses[-1] > losses[0]:
            raise ValueError(f"calibration: loss rose from {losses[0]:.3f} to {losses[-1]:.3f} in "
                             f"{probe_steps} steps at lr={train_cfg.lr}; lower "
                             f"studies.{self.name}.train.lr")
        return result

    def diagnose(self, params: Params, spec: RunSpec, trainer: BPTransformerTrainer,
                 device: torch.device) -> dict[str, Any]:
        """Held-out CE on more windows than during training, entropy, samples."""
        codec = load_codec(tokens_dir() / "tokenizer.json")
        model = trainer.ema.averaged(trainer.model).eval()
        stream = TokenStream(trainer.val, model.shape.block_size, trainer.cfg.batch_size,
                             EVAL_SEED + 1)
        ce, ent = [], []
        with torch.no_grad():
            for _ in range(2 * trainer.cfg.eval_batches):
                x, y = stream.next_batch(device)
                logits = model(x)
                ce.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
                logp = logits.log_softmax(-1)
                ent.append(-(logp.exp() * logp).sum(-1).mean().item())
            samples = [codec.decode(sample(model, codec.encode(prompt), 80, device, seed=i))
                       for i, prompt in enumerate(["Once upon a time", "Question: How many"])]
        return {"metrics": {"val_loss": float(np.mean(ce)), "pred_entropy": float(np.mean(ent)),
                            "ln_vocab": math.log(codec.vocab_size)},
                "samples": samples}


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
