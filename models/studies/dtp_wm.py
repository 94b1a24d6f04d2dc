"""The ``dtp-wm`` study (METHODS §1, log 000): a latent world model on token windows
(``models.seq.dtp``) trained by difference target propagation, and its BPTT-trained twin.

Both rows train the same ``WorldModel`` with AdamW on the same windows and the same posterior
noise (a private generator in the trainer state). The DTP row's update is the gradient of the
layer-local target losses; it also trains its inverses (own Adam, checkpointed) and its
precisions. Calibration pre-trains the inverses and picks the temporal target gain (see
``models.seq.dtp``); both are part of the run (the inverses' weights travel in the calibration
file's place: the trainer's first step re-runs the same pre-training on its own seed's model).

Logged per step (CONVENTIONS): ``term/ce``, ``term/kl``, ``term/inverse_rec``, ``kl`` and
``entropy`` (the trajectories: KL(q || p) per token; the entropy of the decoder's prediction from
the prior mean on the training window), ``target/<layer>`` (RMS per unit of the target
difference: 0_dec top, 1_latent, 2_state, 3_state_first = the earliest position, deepest through
time), ``coverage/state_slots`` and ``coverage/latent`` (fraction of slots / latent units with a
non-zero target), ``precision/<layer>``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.config import Params, TrainConfig
from models.config.seq import DTPRule, DTPWMConfig, SeqBPRule, WorldModelConfig
from models.data.tokens import TokenStream, load_codec
from models.pipeline import RunSpec, tokens_dir
from models.seq import dtp
from models.seq.precision import Precision
from models.studies.seq_common import (
    EVAL_SEED,
    check_init_loss,
    lm_health,
    train_tokens,
    val_tokens,
    vocab_size,
)
from models.training import rng

TIME_GAINS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # calibration's grid, largest first


class DTPWMTrainer:
    def __init__(self, model_cfg: WorldModelConfig, train_cfg: TrainConfig,
                 rule: DTPRule | SeqBPRule, time_gain: float, seed: int,
                 device: torch.device) -> None:
        rng.seed_everything(seed)
        self.device, self.cfg, self.rule = device, train_cfg, rule
        self.model = dtp.WorldModel(model_cfg, vocab_size()).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr,
                                           betas=(0.9, 0.95), weight_decay=train_cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(seed + 7919)  # posterior and inverse noise
        self.time_gain = time_gain
        self.inverses: dtp.Inverses | None = None
        self.inv_opt: torch.optim.Optimizer | None = None
        self.precision: Precision | None = None
        if isinstance(rule, DTPRule):
            self.inverses = dtp.Inverses(self.model, rule.inverse.hidden).to(device)
            self.inv_opt = torch.optim.Adam(self.inverses.parameters(), lr=rule.inverse.lr)
            self.precision = Precision(len(dtp.LAYERS), rule.precision, device)
        self.stream = TokenStream(train_tokens(), model_cfg.block_size, train_cfg.batch_size,
                                  seed)
        self.val = val_tokens()
        self._last: dict[str, float] = {}
        self.last_mask: np.ndarray | None = None

    def eps(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        return torch.randn((t, b, self.model.cfg.latent), generator=self.gen).to(self.device)

    def train_inverses(self, r: dtp.Rollout, steps: int) -> float:
        assert self.inverses is not None and self.inv_opt is not None
        assert isinstance(self.rule, DTPRule)
        loss = 0.0
        for _ in range(steps):
            with torch.enable_grad():
                rec = dtp.reconstruction_loss(self.model, self.inverses, r,
                                              self.rule.inverse.noise, self.gen)
                self.inv_opt.zero_grad(set_to_none=True)
                rec.backward()
            self.inv_opt.step()
            loss = rec.item()
        return loss

    def train_step(self, step: int, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if step == 0 and isinstance(self.rule, DTPRule):  # as at calibration, from this seed
            out_pre = self.pretrain_inverses(self.rule.inverse.pretrain_steps)
        x, y = self.stream.next_batch(self.device)
        eps = self.eps(x)
        params = list(self.model.parameters())
        out: dict[str, float] = {"inverse_pretrain_rec": out_pre} if step == 0 and isinstance(
            self.rule, DTPRule) else {}
        if isinstance(self.rule, DTPRule):
            assert self.inverses is not None and self.precision is not None
            with torch.no_grad():
                r = dtp.rollout(self.model, x, y, eps)
            out["term/inverse_rec"] = self.train_inverses(r, self.rule.inverse.steps)
            tau = dtp.targets(self.model, self.inverses, r, y, self.rule.eta, self.time_gain,
                              self.rule.keep_norm)
            pi = self.precision.values()
            with torch.enable_grad():
                local = dtp.local_loss(self.model, r, x, y, tau, pi, self.rule.eta)
                grads = torch.autograd.grad(local, params)
            self.precision.update(dtp.layer_mean_sq(r, tau))
            stats = dtp.target_stats(self.model, r, tau)
            out.update(stats)
            cfg = self.model.cfg
            self.last_mask = dtp.slot_mask((tau.h - r.h).reshape(
                *r.h.shape[:-1], cfg.slots, cfg.slot_dim)).cpu().numpy()
            out.update({f"precision/{n}": float(v) for n, v in zip(dtp.LAYERS, pi, strict=True)})
            _, ce, kl = dtp.objective(self.model, r, y)
        else:
            with torch.enable_grad():
                r = dtp.rollout(self.model, x, y, eps)
                total, ce, kl = dtp.objective(self.model, r, y)
                grads = torch.autograd.grad(total, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last = {f"update/{n}": (p.detach() - before[n]).norm().item()
                      for n, p in self.model.named_parameters()}
        self._last.update({f"grad/{n}": g.norm().item()
                           for (n, _), g in zip(self.model.named_parameters(), grads, strict=True)})
        self._last["act/state"] = float(r.h.detach().pow(2).mean().sqrt())
        with torch.no_grad():
            logp = self.model.out(self.model.decode(r.h.detach(), r.prior_mu.detach())
                                  ).log_softmax(-1)
            entropy = float(-(logp.exp() * logp).sum(-1).mean())
        loss = ce.item() + self.model.cfg.kl_weight * kl.item()
        out.update({"loss": loss, "term/ce": ce.item(), "term/kl": kl.item(), "kl": kl.item(),
                    "entropy": entropy, "grad_norm": float(grad_norm)})
        return out

    def layer_stats(self) -> dict[str, float]:
        return dict(self._last)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        ce, ent = self.held_out(self.cfg.eval_batches, EVAL_SEED)
        return {"val_loss": ce, "val_entropy": ent}

    @torch.no_grad()
    def held_out(self, batches: int, seed: int) -> tuple[float, float]:
        """Predictive CE and entropy under the prior on fixed validation windows (private
        generators: the training RNG is untouched)."""
        stream = TokenStream(self.val, self.model.cfg.block_size, self.cfg.batch_size, seed)
        gen = torch.Generator().manual_seed(seed)
        ce, ent = [], []
        for _ in range(batches):
            x, y = stream.next_batch(self.device)
            c, e = dtp.predictive(self.model, x, y, self.model.cfg.eval_samples, gen)
            ce.append(c.mean().item())
            ent.append(e.mean().item())
        return float(np.mean(ce)), float(np.mean(ent))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stream": self.stream.state_dict(), "gen": self.gen.get_state(),
                "time_gain": self.time_gain,
                "inverses": None if self.inverses is None else self.inverses.state_dict(),
                "inv_opt": None if self.inv_opt is None else self.inv_opt.state_dict(),
                "precision": None if self.precision is None else self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.gen.set_state(state["gen"])
        self.time_gain = float(state["time_gain"])
        if self.inverses is not None and self.inv_opt is not None:
            self.inverses.load_state_dict(state["inverses"])
            self.inv_opt.load_state_dict(state["inv_opt"])
        if self.precision is not None:
            self.precision.load_state_dict(state["precision"])

    # ------------------------------------------------------------------ calibration
    def pretrain_inverses(self, steps: int) -> float:
        """Difference reconstruction on fresh training windows at the initial weights (uses and
        advances the trainer's own stream and generator, so every seed does the same thing)."""
        assert isinstance(self.rule, DTPRule)
        loss = math.nan
        for _ in range(steps):
            x, y = self.stream.next_batch(self.device)
            with torch.no_grad():
                r = dtp.rollout(self.model, x, y, self.eps(x))
            loss = self.train_inverses(r, 1)
        return loss

    def target_norms(self, batches: int, gain: float) -> dict[str, float]:
        """Mean target statistics over ``batches`` windows from a fixed generator."""
        assert self.inverses is not None and isinstance(self.rule, DTPRule)
        stream = TokenStream(train_tokens(), self.model.cfg.block_size, self.cfg.batch_size, 1)
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(batches):
            x, y = stream.next_batch(self.device)
            eps = torch.randn((x.shape[1], x.shape[0], self.model.cfg.latent), generator=gen)
            with torch.no_grad():
                r = dtp.rollout(self.model, x, y, eps.to(self.device))
            tau = dtp.targets(self.model, self.inverses, r, y, self.rule.eta, gain,
                              self.rule.keep_norm)
            rows.append(dtp.target_stats(self.model, r, tau))
        return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def target_ratio(norms: dict[str, float]) -> float:
    """Bottom (earliest state) over top (decoder) target norm."""
    return norms["target/3_state_first"] / max(norms["target/0_dec"], 1e-30)


class DTPWMStudy:
    name = "dtp_wm"
    title = "dtp-wm: latent world model, difference target propagation vs its BPTT twin"
    columns = (("final_val_loss", "val CE (prior)"), ("best_val_loss", "best val CE"),
               ("ce_over_ln_vocab", "CE / ln V"),
               ("entropy_first", "entropy (first)"), ("entropy_last", "entropy (last)"),
               ("kl_first", "KL (first)"), ("kl_last", "KL (last)"),
               ("target_ratio", "target bottom/top"), ("slot_coverage", "slot coverage"),
               ("ms_per_step", "ms/step"))
    plots = (("val_loss", "held-out predictive cross-entropy (prior)"),
             ("entropy", "predictive entropy (training windows)"),
             ("kl", "KL(posterior || prior) per token"),
             ("target/0_dec", "target norm, decoder (top)"),
             ("target/3_state_first", "target norm, earliest state (bottom)"),
             ("coverage/state_slots", "fraction of state slots with a target"))

    @staticmethod
    def extra_markdown(frame: pd.DataFrame) -> str:
        """Says plainly whether predictive entropy fell and KL(q || p) rose over training (log
        000: 3.47 -> 3.03 and 0.001 -> 0.144) and how DTP's held-out CE compares with BPTT's."""
        lines = ["### Does it reproduce log 000?", ""]
        ce = frame.groupby("row")["val_loss"].mean()
        for row, g in frame.groupby("row", sort=False):
            if "entropy_first" not in g or g["entropy_first"].isna().all():
                continue
            e0, e1 = g["entropy_first"].mean(), g["entropy_last"].mean()
            k0, k1 = g["kl_first"].mean(), g["kl_last"].mean()
            line = (f"- **{row}**: predictive entropy {'falls' if e1 < e0 else 'does NOT fall'} "
                    f"({e0:.3f} -> {e1:.3f}; the log: 3.47 -> 3.03), KL(posterior || prior) "
                    f"{'rises' if k1 > k0 else 'does NOT rise'} ({k0:.4f} -> {k1:.4f}; the log: "
                    f"0.001 -> 0.144), mean of {len(g)} seeds; held-out CE {ce[row]:.3f}")
            others = [f"{r} {v:.3f}" for r, v in ce.items() if r != row]
            lines.append(line + (f" (vs {', '.join(others)})." if others else "."))
        return "\n".join(lines)

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      device: torch.device) -> DTPWMTrainer:
        study = params.study_as(spec.study, DTPWMConfig)
        rule = study.rules[spec.row]
        return DTPWMTrainer(study.row_model(spec.row), study.row_train(spec.row), rule,
                            float(calibration.get("time_gain", 1.0)), spec.seed, device)

    def calibrate(self, params: Params, row: str, device: torch.device) -> dict[str, Any]:
        """Initial predictive CE vs ln V and the references; for DTP: pre-train the inverses,
        then the largest temporal gain (``TIME_GAINS``, or the row's fixed ``time_gain``) whose
        earliest-state target norm is within 2x of the top's, and the per-layer target norms."""
        study = params.study_as(self.name, DTPWMConfig)
        rule = study.rules[row]
        trainer = DTPWMTrainer(study.row_model(row), study.row_train(row), rule, 1.0, 0, device)
        init_loss, init_ent = trainer.held_out(2, EVAL_SEED)
        check_init_loss(init_loss, self.name)
        out: dict[str, Any] = {"ln_vocab": math.log(vocab_size()), "init_val_loss": init_loss,
                               "init_entropy": init_ent, "health": lm_health(init_loss)}
        if not isinstance(rule, DTPRule):
            return out
        rec = trainer.pretrain_inverses(rule.inverse.pretrain_steps)
        gains = (rule.time_gain,) if rule.time_gain is not None else TIME_GAINS
        tried = {}
        for gain in gains:
            norms = trainer.target_norms(2, gain)
            tried[str(gain)] = norms
            if 0.5 <= target_ratio(norms) <= 2.0:
                break
        else:
            raise ValueError(f"calibration: no temporal gain in {gains} keeps the earliest "
                             f"state's target norm within 2x of the top's ({tried}); adjust "
                             f"rules.{row}.eta or the inverses (rules.{row}.inverse)")
        out.update({"time_gain": gain, "target_norms": norms, "target_ratio": target_ratio(norms),
                    "inverse_rec": rec, "tried": tried})
        return out

    def diagnose(self, params: Params, spec: RunSpec, trainer: DTPWMTrainer,
                 device: torch.device) -> dict[str, Any]:
        """Held-out predictive CE and entropy, the entropy/KL trajectories (first and last
        logged rows), target norms and slot coverage on held-out windows, text samples."""
        from models.training.segments import read_logs

        ce, ent = trainer.held_out(2 * trainer.cfg.eval_batches, EVAL_SEED + 1)
        v = vocab_size()
        metrics: dict[str, float] = {"val_loss": ce, "val_entropy": ent, "ln_vocab": math.log(v),
                                     "ce_over_ln_vocab": ce / math.log(v)}
        logs = [r for r in read_logs(spec.log_dir) if "kl" in r]
        if logs:
            metrics.update({"entropy_first": logs[0]["entropy"], "entropy_last": logs[-1]["entropy"],
                            "kl_first": logs[0]["kl"], "kl_last": logs[-1]["kl"]})
        extras: dict[str, Any] = {"vocab_size": v}
        if isinstance(trainer.rule, DTPRule):
            stream = TokenStream(trainer.val, trainer.model.cfg.block_size,
                                 trainer.cfg.batch_size, EVAL_SEED + 2)
            x, y = stream.next_batch(device)
            gen = torch.Generator().manual_seed(EVAL_SEED)
            eps = torch.randn((x.shape[1], x.shape[0], trainer.model.cfg.latent), generator=gen)
            assert trainer.inverses is not None
            with torch.no_grad():
                r = dtp.rollout(trainer.model, x, y, eps.to(device))
            tau = dtp.targets(trainer.model, trainer.inverses, r, y, trainer.rule.eta,
                              trainer.time_gain, trainer.rule.keep_norm)
            stats = dtp.target_stats(trainer.model, r, tau)
            cfg = trainer.model.cfg
            mask = dtp.slot_mask((tau.h - r.h).reshape(*r.h.shape[:-1], cfg.slots,
                                                       cfg.slot_dim)).cpu().numpy()
            metrics.update({k.replace("/", "_"): val for k, val in stats.items()})
            metrics["target_ratio"] = target_ratio(stats)
            metrics["slot_coverage"] = float(mask.mean())
            extras["coverage_slots"] = {"state_slots": mask.astype(int).tolist()}
        codec = load_codec(tokens_dir() / "tokenizer.json")
        gen = torch.Generator().manual_seed(0)
        samples = [codec.decode(dtp.generate(trainer.model, codec.encode(p), 80, gen))
                   for p in ("Once upon a time", "Question: How many")]
        return {"metrics": metrics, "samples": samples, "extras": extras}
