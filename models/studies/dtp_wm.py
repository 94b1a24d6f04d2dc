"""The ``dtp-wm`` study (METHODS §1, log 000): a latent world model on token windows
(``models.seq.dtp``) trained by difference target propagation, and its BPTT-trained twin.

Both rows train the same ``WorldModel`` with the one trainer (``models.training.trainer``) on
the same windows and the same posterior noise (``NoisyWindows``: a private generator,
checkpointed). The DTP row's update is the gradient of the layer-local target losses
(``DifferenceTargetProp``); it also trains its inverses (own Adam, checkpointed) and its
precisions. Calibration pre-trains the inverses and picks the temporal target gain (see
``models.seq.dtp``); both are part of the run (the inverses' weights travel in the calibration
file's place: the rule's ``pretrain`` re-runs the same pre-training on its own seed's model).

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
from torch import Tensor, nn

from models.config import Params, TrainConfig
from models.config.seq import DTPRule, DTPWMConfig, WorldModelConfig
from models.context import RunContext
from models.pipeline import RunSpec
from models.seq import dtp
from models.seq.precision import Precision
from models.studies.base import NO_RECORD, RunRecord
from models.studies.seq_common import EVAL_SEED, check_init_loss, lm_health
from models.training import rng
from models.training.batches import Batches
from models.training.trainer import Backprop, LearningRule, Trainer
from models.training.windows import Windows

TIME_GAINS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # calibration's grid, largest first


class NoisyWindows:
    """Token windows with their posterior noise, (x, y, eps): both rows train on the same windows
    under the same noise; the stream and the noise generator are the state."""

    def __init__(self, tokens: np.ndarray, cfg: WorldModelConfig, batch_size: int, seed: int,
                 noise_seed: int, device: torch.device) -> None:
        self.windows = Windows(tokens, cfg.block_size, batch_size, seed, device)
        self.latent = cfg.latent
        self.gen = torch.Generator().manual_seed(noise_seed)

    def next(self, step: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        x, y = self.windows.next(step)
        b, t = x.shape
        eps = torch.randn((t, b, self.latent), generator=self.gen).to(self.windows.device)
        return x, y, eps

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.windows.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state["stream"])
        self.gen.set_state(state["gen"])


def objective_stats(model: dtp.WorldModel, ce: Tensor, kl: Tensor) -> dict[str, float]:
    """``loss`` = CE + kl_weight KL and its terms; ``kl`` is the KL trajectory's key."""
    return {"loss": ce.item() + model.cfg.kl_weight * kl.item(), "term/ce": ce.item(),
            "term/kl": kl.item(), "kl": kl.item()}


def rollout_stats(model: dtp.WorldModel, r: dtp.Rollout | None) -> dict[str, float]:
    """``act/state`` and ``entropy`` (of the decoder's prediction from the prior mean) on the
    last training window, at the current weights."""
    if r is None:
        return {}
    with torch.no_grad():
        logp = model.out(model.decode(r.h.detach(), r.prior_mu.detach())).log_softmax(-1)
    return {"act/state": float(r.h.detach().pow(2).mean().sqrt()),
            "entropy": float(-(logp.exp() * logp).sum(-1).mean())}


class WorldModelBP(Backprop):
    """The BP row: BPTT of CE + KL through the rollout."""

    def __init__(self) -> None:
        super().__init__(self._objective)
        self.rollout: dtp.Rollout | None = None

    def _objective(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor],
                   ) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, dtp.WorldModel)
        x, y, eps = batch
        self.rollout = r = dtp.rollout(model, x, y, eps)
        total, ce, kl = dtp.objective(model, r, y)
        return total, objective_stats(model, ce, kl)

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        return rollout_stats(model, self.rollout)  # type: ignore[arg-type]


class DifferenceTargetProp(LearningRule):
    """The DTP row: targets from the loss down through the learned inverses and back through
    time (``models.seq.dtp``); every layer fits its own target, the inverses learn by difference
    reconstruction (own Adam), the precisions from the target differences.

    The inverses' noise draws from the posterior-noise generator of the batches (``noise``), as
    one noise stream per run. State: inverses, their optimizer, precisions, the temporal gain.
    """

    def __init__(self, model: dtp.WorldModel, cfg: DTPRule, time_gain: float,
                 noise: torch.Generator, device: torch.device) -> None:
        self.cfg, self.time_gain, self.noise = cfg, time_gain, noise
        self.inverses = dtp.Inverses(model, cfg.inverse.hidden).to(device)
        self.inv_opt = torch.optim.Adam(self.inverses.parameters(), lr=cfg.inverse.lr)
        self.precision = Precision(len(dtp.LAYERS), cfg.precision, device)
        self.rollout: dtp.Rollout | None = None
        self.last_mask: np.ndarray | None = None  # state slots that got a target, last step

    def pretrain(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Difference reconstruction on fresh training windows at the initial weights (the
        run's own windows and noise, so every seed does what calibration did)."""
        assert isinstance(model, dtp.WorldModel)
        loss = math.nan
        for _ in range(self.cfg.inverse.pretrain_steps):
            x, y, eps = batches.next(0)
            with torch.no_grad():
                r = dtp.rollout(model, x, y, eps)
            loss = self.train_inverses(model, r, 1)
        return {"inverse_pretrain_rec": loss}

    def train_inverses(self, model: dtp.WorldModel, r: dtp.Rollout, steps: int) -> float:
        loss = 0.0
        for _ in range(steps):
            with torch.enable_grad():
                rec = dtp.reconstruction_loss(model, self.inverses, r, self.cfg.inverse.noise,
                                              self.noise)
                self.inv_opt.zero_grad(set_to_none=True)
                rec.backward()
            self.inv_opt.step()
            loss = rec.item()
        return loss

    def grads(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], step: int,
              ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(model, dtp.WorldModel)
        x, y, eps = batch
        with torch.no_grad():
            r = dtp.rollout(model, x, y, eps)
        stats = {"term/inverse_rec": self.train_inverses(model, r, self.cfg.inverse.steps)}
        tau = self.targets(model, r, y, self.time_gain)
        pi = self.precision.values()
        names, params = zip(*model.named_parameters(), strict=True)
        with torch.enable_grad():
            local = dtp.local_loss(model, r, x, y, tau, pi, self.cfg.eta)
            grads = torch.autograd.grad(local, params)
        self.precision.update(dtp.layer_mean_sq(r, tau))
        stats.update(dtp.target_stats(model, r, tau))
        self.last_mask = slot_mask(model, r, tau)
        stats.update({f"precision/{n}": float(v) for n, v in zip(dtp.LAYERS, pi, strict=True)})
        _, ce, kl = dtp.objective(model, r, y)
        self.rollout = r
        return dict(zip(names, grads, strict=True)), {**stats, **objective_stats(model, ce, kl)}

    def targets(self, model: dtp.WorldModel, r: dtp.Rollout, y: Tensor,
                time_gain: float) -> dtp.Targets:
        return dtp.targets(model, self.inverses, r, y, self.cfg.eta, time_gain,
                           self.cfg.keep_norm)

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        return rollout_stats(model, self.rollout)  # type: ignore[arg-type]

    def target_norms(self, model: dtp.WorldModel, tokens: np.ndarray, batch_size: int,
                     batches: int, gain: float, device: torch.device) -> dict[str, float]:
        """Mean target statistics over ``batches`` windows of ``tokens`` (the training split)
        from a fixed generator."""
        windows = NoisyWindows(tokens, model.cfg, batch_size, 1, 1, device)
        rows = []
        for _ in range(batches):
            x, y, eps = windows.next()
            with torch.no_grad():
                r = dtp.rollout(model, x, y, eps)
            rows.append(dtp.target_stats(model, r, self.targets(model, r, y, gain)))
        return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"time_gain": self.time_gain, "inverses": self.inverses.state_dict(),
                "inv_opt": self.inv_opt.state_dict(), "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.time_gain = float(state["time_gain"])
        self.inverses.load_state_dict(state["inverses"])
        self.inv_opt.load_state_dict(state["inv_opt"])
        self.precision.load_state_dict(state["precision"])


def slot_mask(model: dtp.WorldModel, r: dtp.Rollout, tau: dtp.Targets) -> np.ndarray:
    """Which state slots received a non-zero target (per position and window)."""
    cfg = model.cfg
    return dtp.slot_mask((tau.h - r.h).reshape(*r.h.shape[:-1], cfg.slots,
                                               cfg.slot_dim)).cpu().numpy()


def build(study: DTPWMConfig, row: str, seed: int, time_gain: float,
          ctx: RunContext) -> Trainer:
    """A row's world model, rule (DTP, or BPTT) and training windows with their noise."""
    rule_cfg, model_cfg, train_cfg = study.rules[row], study.row_model(row), study.row_train(row)
    rng.seed_everything(seed)
    device, tokens = ctx.device, ctx.tokens
    model = dtp.WorldModel(model_cfg, tokens.vocab_size).to(device)
    batches = NoisyWindows(tokens.train, model_cfg, train_cfg.batch_size, seed, seed + 7919,
                           device)
    rule: LearningRule = (DifferenceTargetProp(model, rule_cfg, time_gain, batches.gen, device)
                          if isinstance(rule_cfg, DTPRule) else WorldModelBP())

    def evaluate(m: nn.Module) -> dict[str, float]:
        ce, ent = held_out(m, tokens.val, train_cfg, train_cfg.eval_batches, EVAL_SEED, device)
        return {"val_loss": ce, "val_entropy": ent}

    return Trainer(model, rule, batches, evaluate, train_cfg)


@torch.no_grad()
def held_out(model: nn.Module, val: np.ndarray, cfg: TrainConfig, batches: int, seed: int,
             device: torch.device) -> tuple[float, float]:
    """Predictive CE and entropy under the prior on fixed validation windows (private
    generators: the training RNG is untouched)."""
    assert isinstance(model, dtp.WorldModel)
    windows = Windows(val, model.cfg.block_size, cfg.batch_size, seed, device)
    gen = torch.Generator().manual_seed(seed)
    ce, ent = [], []
    for _ in range(batches):
        x, y = windows.next()
        c, e = dtp.predictive(model, x, y, model.cfg.eval_samples, gen)
        ce.append(c.mean().item())
        ent.append(e.mean().item())
    return float(np.mean(ce)), float(np.mean(ent))


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
                      ctx: RunContext) -> Trainer:
        return build(params.study_as(spec.study, DTPWMConfig), spec.row, spec.seed,
                     float(calibration.get("time_gain", 1.0)), ctx)

    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]:
        """Initial predictive CE vs ln V and the references; for DTP: pre-train the inverses,
        then the largest temporal gain (``TIME_GAINS``, or the row's fixed ``time_gain``) whose
        earliest-state target norm is within 2x of the top's, and the per-layer target norms."""
        trainer = build(params.study_as(self.name, DTPWMConfig), row, 0, 1.0, ctx)
        model, rule = trainer.model, trainer.rule
        assert isinstance(model, dtp.WorldModel)
        tokens = ctx.tokens
        init_loss, init_ent = held_out(model, tokens.val, trainer.cfg, 2, EVAL_SEED, ctx.device)
        check_init_loss(init_loss, tokens.vocab_size, self.name)
        out: dict[str, Any] = {"ln_vocab": math.log(tokens.vocab_size),
                               "init_val_loss": init_loss, "init_entropy": init_ent,
                               "health": lm_health(tokens, init_loss)}
        if not isinstance(rule, DifferenceTargetProp):
            return out
        rec = rule.pretrain(model, trainer.batches)["inverse_pretrain_rec"]
        gains = (rule.cfg.time_gain,) if rule.cfg.time_gain is not None else TIME_GAINS
        tried = {}
        for gain in gains:
            norms = rule.target_norms(model, tokens.train, trainer.cfg.batch_size, 2, gain,
                                      ctx.device)
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

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer,
                 ctx: RunContext, record: RunRecord = NO_RECORD) -> dict[str, Any]:
        """Held-out predictive CE and entropy, the entropy/KL trajectories (first and last
        logged rows), target norms and slot coverage on held-out windows, text samples."""
        model, rule = trainer.model, trainer.rule
        assert isinstance(model, dtp.WorldModel)
        device, tokens = ctx.device, ctx.tokens
        ce, ent = held_out(model, tokens.val, trainer.cfg, 2 * trainer.cfg.eval_batches,
                           EVAL_SEED + 1, device)
        v = tokens.vocab_size
        metrics: dict[str, float] = {"val_loss": ce, "val_entropy": ent, "ln_vocab": math.log(v),
                                     "ce_over_ln_vocab": ce / math.log(v)}
        logs = [r for r in record.logs if "kl" in r]
        if logs:
            metrics.update({"entropy_first": logs[0]["entropy"], "entropy_last": logs[-1]["entropy"],
                            "kl_first": logs[0]["kl"], "kl_last": logs[-1]["kl"]})
        extras: dict[str, Any] = {"vocab_size": v}
        if isinstance(rule, DifferenceTargetProp):
            windows = NoisyWindows(tokens.val, model.cfg, trainer.cfg.batch_size,
                                   EVAL_SEED + 2, EVAL_SEED, device)
            x, y, eps = windows.next()
            with torch.no_grad():
                r = dtp.rollout(model, x, y, eps)
            tau = rule.targets(model, r, y, rule.time_gain)
            stats = dtp.target_stats(model, r, tau)
            mask = slot_mask(model, r, tau)
            metrics.update({k.replace("/", "_"): val for k, val in stats.items()})
            metrics["target_ratio"] = target_ratio(stats)
            metrics["slot_coverage"] = float(mask.mean())
            extras["coverage_slots"] = {"state_slots": mask.astype(int).tolist()}
        codec = tokens.codec
        gen = torch.Generator().manual_seed(0)
        samples = [codec.decode(dtp.generate(model, codec.encode(p), 80, gen))
                   for p in ("Once upon a time", "Question: How many")]
        return {"metrics": metrics, "samples": samples, "extras": extras}
