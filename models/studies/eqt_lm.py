"""The ``eqt-lm`` study: language modelling on the token corpus, one row per learning rule.

Rows share data, tokenizer, evaluation windows and model shape (n_embd, n_head, block_size). The
``bp`` row trains a standard pre-LN transformer (``models.nets.transformer``); ``bptt`` and ``ep``
rows train the equilibrium LM of ``models.eqt`` (one block relaxed to a fixed point) with the
gradient of the rule (METHODS §2), AdamW on top, the jacreg controller in the loop.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import io
from models.config import Params, TrainConfig
from models.config.eqt import (
    BPRule,
    BPTTRule,
    EPRule,
    EqRule,
    LMModelConfig,
    LMStudyConfig,
    RelaxConfig,
    StabiliserConfig,
)
from models.data.tokens import TokenStream, load_codec, read_tokens
from models.eqt import bptt as eqt_bptt
from models.eqt import diagnostics as eqt_diag
from models.eqt import ep as eqt_ep
from models.eqt import implicit as eqt_implicit
from models.eqt.calibration import calibrate as calibrate_relax
from models.eqt.fast import FastEQ
from models.eqt.model import EqShape, EquilibriumLM, gradients
from models.eqt.stabilisers import JacregController
from models.nets.transformer import TransformerLM, TransformerShape
from models.pipeline import RunSpec, tokens_dir
from models.studies import baselines
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


def eq_model(model_cfg: LMModelConfig, rule: EqRule, relax: RelaxConfig) -> EquilibriumLM:
    if model_cfg.n_layer != 1:
        raise ValueError(f"the equilibrium LM has one block; set model.n_layer=1 for row kind "
                         f"{rule.kind!r} (got {model_cfg.n_layer})")
    b = rule.block
    return EquilibriumLM(EqShape(
        vocab_size=vocab_size(), block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
        n_head=model_cfg.n_head, qk_norm=model_cfg.qk_norm, damping=b.damping, block=b.kind,
        emb_std=b.emb_std, init_std=b.init_std, resinit=b.resinit), relax)


class EquilibriumTrainer:
    """AdamW on an ``EquilibriumLM`` with the gradients of a ``bptt`` or ``ep`` row.

    The jacreg probe draws from the global torch RNG, which the segment driver checkpoints, and
    the controller's (lambda, res EMA) is part of ``state_dict``, so resumed runs are bit-exact.
    """

    def __init__(self, model_cfg: LMModelConfig, train_cfg: TrainConfig, rule: EqRule,
                 relax: RelaxConfig, seed: int, device: torch.device) -> None:
        rng.seed_everything(seed)
        self.device = device
        self.cfg = train_cfg
        self.rule = rule
        self.model = eq_model(model_cfg, rule, relax).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr, betas=(0.9, 0.95))
        self.ema = EMA(self.model, train_cfg.ema_decay)
        self.controller = JacregController.from_config(rule.stab) if rule.stab.controller else None
        self.stream = TokenStream(read_tokens(tokens_dir() / "train.bin"), model_cfg.block_size,
                                  train_cfg.batch_size, seed)
        self.val = read_tokens(tokens_dir() / "val.bin")
        self._last: dict[str, float] = {}
        self._last_x: torch.Tensor | None = None
        # The fast GPU step (models.eqt.fast) when asked for and available; the eval model (the
        # EMA copy) gets its own engine, its graphs read the EMA weights in place.
        self.fast: FastEQ | None = None
        self.fast_eval: FastEQ | None = None
        if (rule.fast.enabled and device.type == "cuda" and FastEQ.supports(rule)
                and rule.block.kind == "thick"):
            self.fast = FastEQ(self.model, rule.fast)
            averaged = self.ema.averaged(self.model)
            self.fast_eval = (self.fast if averaged is self.model
                              else FastEQ(averaged, rule.fast))  # type: ignore[arg-type]

    @property
    def cos_every(self) -> int:
        return self.rule.cos_every if isinstance(self.rule, EPRule) else 0

    def train_step(self, step: int, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.stream.next_batch(self.device)
        out: dict[str, float] = {}
        if self.cos_every and (step + 1) % self.cos_every == 0:
            out.update(self.task_cosines(x, y))
        if self.fast is not None:
            grads, stats = self.fast.gradients(x, y, self.rule, self.controller)
        else:
            grads, stats = gradients(self.model, x, y, self.rule, self.controller)
        for name, p in self.model.named_parameters():
            p.grad = grads[name]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.cfg.grad_clip or float("inf"))
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self._last = _param_stats_from(self.model, before, grads)
        self._last_x = x
        out.update({k: float(v) for k, v in stats.items() if not k.startswith("grad/")})
        out["grad_norm"] = float(grad_norm)
        out["grad/global"] = stats["grad/global"]
        if isinstance(self.rule, EPRule):  # the free phase behind residual/settle_iters
            out["settle/free/tol"] = self.model.relax_cfg.res_target
            out["settle/free/cap"] = float(self.model.relax_cfg.t1max)
        if self.controller is not None:
            out["lambda"] = self.controller.lam  # after this step's update (what the next uses)
        return out

    def task_cosines(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """cos(g_rule, g_BPTT) per group and global on one batch: task gradients only (no
        stabilisers), at the current weights."""
        if not isinstance(self.rule, EPRule):
            raise TypeError(f"task cosines need an EP row, not {self.rule.kind!r}")
        if self.fast is not None:
            # The training step's own estimator against the exact unroll gradient, both on the
            # fast path (the eager BPTT needs ~28 GB at the log's shape).
            plain = StabiliserConfig(controller=False)
            g, _ = self.fast.gradients(x, y, EPRule(nudge=self.rule.nudge, stab=plain))
            g = {n: t.clone() for n, t in g.items()}
            g_ref, _ = self.fast.gradients(x, y, BPTTRule(stab=plain))
            return eqt_diag.grad_cosines(g, g_ref)
        g, _ = eqt_ep.ep_gradients(self.model, x, y, self.rule.nudge)
        g_ref, _, _ = eqt_bptt.bptt_gradients(self.model, x, y)
        return eqt_diag.grad_cosines(g, g_ref)

    def layer_stats(self) -> dict[str, float]:
        """Gradient/update norms of the last step, and activation RMS of x_in and of z* on the
        last training batch at the updated weights (one extra no-grad free phase)."""
        out = dict(self._last)
        if self._last_x is not None:
            with torch.no_grad():
                x_in = self.model.x_in(self._last_x)
                z = (self.fast.free_phase(self._last_x) if self.fast is not None
                     else self.model.free_phase(self._last_x)).z
            out["act/x_in"] = x_in.pow(2).mean().sqrt().item()
            out["act/z_star"] = z.pow(2).mean().sqrt().item()
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"val_loss": self.val_loss(self.cfg.eval_batches)}

    @torch.no_grad()
    def val_loss(self, batches: int, seed: int = EVAL_SEED) -> float:
        """Held-out CE through the free phase, on the same windows as the BP row."""
        model = self.ema.averaged(self.model)
        loss = model.loss if self.fast_eval is None else self.fast_eval.loss
        stream = TokenStream(self.val, model.shape.block_size, self.cfg.batch_size, seed)
        return float(np.mean([float(loss(*stream.next_batch(self.device)))
                              for _ in range(batches)]))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "stream": self.stream.state_dict(),
                "controller": None if self.controller is None else self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.stream.load_state_dict(state["stream"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


def _param_stats_from(model: torch.nn.Module, before: dict[str, torch.Tensor],
                      grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """``grad/<name>`` (the rule's gradient incl. stabilisers, before clipping) and
    ``update/<name>``."""
    names = list(grads)
    params = dict(model.named_parameters())
    norms = torch.stack([grads[n].norm() for n in names]
                        + [(params[n].detach() - before[n]).norm() for n in names]).tolist()
    out = {f"grad/{n}": v for n, v in zip(names, norms[:len(names)], strict=True)}
    out.update({f"update/{n}": v for n, v in zip(names, norms[len(names):], strict=True)})
    return out  # one host sync for all norms (a GPU step is ~60 ms; 40 syncs cost several)


class EqtLMStudy:
    name = "eqt_lm"
    title = "eqt-lm: language modelling, BP transformer vs equilibrium propagation"
    columns = (("best_val_loss", "best val CE"), ("final_val_loss", "final val CE"),
               ("residual", "final residual"), ("cos_bptt", "cos to BPTT"),
               ("cos_implicit", "cos to implicit"),
               ("ms_per_step", "ms/step"), ("peak_mem_mb", "peak MB"))
    plots = (("val_loss", "validation cross-entropy"), ("loss", "training loss"),
             ("cos/global", "cos(g_rule, g_BPTT) during training"))

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      device: torch.device) -> BPTransformerTrainer | EquilibriumTrainer:
        study = params.study_as(spec.study, LMStudyConfig)
        rule = study.rules[spec.row]
        model_cfg, train_cfg = study.row_model(spec.row), study.row_train(spec.row)
        if not isinstance(rule, BPRule):
            return EquilibriumTrainer(model_cfg, train_cfg, rule,
                                      RelaxConfig(**calibration["relax"]), spec.seed, device)
        return BPTransformerTrainer(model_cfg, train_cfg, spec.seed, device)

    def calibrate(self, params: Params, row: str, device: torch.device) -> dict[str, Any]:
        """BP: initial loss vs ln V, activation RMS, a short LR probe. Equilibrium rows: the
        free phase's eps/T1 (``models.eqt.calibration``; eps halved until the relaxation
        converges at init) and the initial loss vs ln V."""
        study = params.study_as(self.name, LMStudyConfig)
        rule = study.rules[row]
        if not isinstance(rule, BPRule):
            return self._calibrate_eq(study.row_model(row), study.row_train(row), rule, device)
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
            "health": _lm_baselines(trainer.val, init_loss),
        }
        _check_init_loss(init_loss, ln_v)
        if not math.isfinite(losses[-1]) or losses[-1] > losses[0]:
            raise ValueError(f"calibration: loss rose from {losses[0]:.3f} to {losses[-1]:.3f} in "
                             f"{probe_steps} steps at lr={train_cfg.lr}; lower "
                             f"studies.{self.name}.train.lr")
        return result

    def _calibrate_eq(self, model_cfg: LMModelConfig, train_cfg: TrainConfig, rule: EqRule,
                      device: torch.device) -> dict[str, Any]:
        trainer = EquilibriumTrainer(model_cfg, train_cfg, rule, rule.relax, seed=0, device=device)
        # 8 windows per batch: enough to see divergence, cheap for the abscissa's power iteration
        batches = [trainer.stream.next_batch(device)[0][:8] for _ in range(3)]
        result = calibrate_relax(trainer.model, batches, search=True)
        trainer.model.relax_cfg = RelaxConfig(**result["relax"])
        ln_v = math.log(vocab_size())
        init_loss = trainer.val_loss(4)
        _check_init_loss(init_loss, ln_v)
        return {**result, "ln_vocab": ln_v, "init_val_loss": init_loss,
                "init_over_ln_vocab": init_loss / ln_v,
                "health": _lm_baselines(trainer.val, init_loss)}

    def diagnose(self, params: Params, spec: RunSpec,
                 trainer: BPTransformerTrainer | EquilibriumTrainer,
                 device: torch.device) -> dict[str, Any]:
        """Held-out CE on more windows than during training, entropy, samples; for equilibrium
        rows also the gradient-quality and operator diagnostics of METHODS §2."""
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
        model.train()
        result: dict[str, Any] = {
            "metrics": {"val_loss": float(np.mean(ce)), "pred_entropy": float(np.mean(ent)),
                        "ln_vocab": math.log(codec.vocab_size)},
            "samples": samples, "extras": {"vocab_size": codec.vocab_size}}
        if isinstance(trainer, EquilibriumTrainer):
            _diagnose_eq(trainer, device, result)
        return result


def _lm_baselines(val: np.ndarray, init_loss: float) -> dict[str, Any]:
    """What every row must beat (models.studies.baselines): ln V, unigram, untrained net."""
    return baselines.language_model(read_tokens(tokens_dir() / "train.bin"), val, vocab_size(),
                                    init_loss)


def _check_init_loss(init_loss: float, ln_v: float) -> None:
    if abs(init_loss / ln_v - 1) > 0.1:
        raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                         f"ln V = {ln_v:.3f}; the initialisation is off")


def _diagnose_eq(trainer: EquilibriumTrainer, device: torch.device, result: dict[str, Any],
                 n_batches: int = 4) -> None:
    """cos(g_rule, g_BPTT) per group and global and k = |g_rule|/|g_BPTT| (task gradients, mean
    over held-out batches), batch-to-batch self-coherence, the free-phase residual and one
    relaxation's residual curve, the numerical abscissa and the 4-number fingerprint."""
    model = trainer.model
    stream = TokenStream(trainer.val, model.shape.block_size, trainer.cfg.batch_size,
                         EVAL_SEED + 2)
    batches = [stream.next_batch(device) for _ in range(n_batches)]
    cos_rows, imp_rows, g_rule, g_refs = [], [], [], []
    for x, y in batches:
        relaxed = model.free_phase(x)
        g_ref, _, _ = eqt_bptt.bptt_gradients(model, x, y)
        t2 = 0.0
        if isinstance(trainer.rule, EPRule):
            g, ep_stats = eqt_ep.ep_gradients(model, x, y, trainer.rule.nudge, relaxed)
            t2 = ep_stats["t2"]
        else:
            g = g_ref
        cos_rows.append({**eqt_diag.grad_cosines(g, g_ref), "t2": t2,
                         "free_steps": float(relaxed.steps), "residual_t1": relaxed.residual_t1})
        # the implicit gradient at the same z*: what EP estimates; BPTT equals it only when the
        # T1-step unroll has converged (late in training the free phase may need more steps)
        g_imp, _ = eqt_implicit.reference_gradients(model, x, y, relaxed)
        if g_imp is not None:
            imp_rows.append({**eqt_diag.grad_cosines(g, g_imp),
                             "bptt": eqt_diag.cosine(g_ref, g_imp)})
        g_rule.append(g)
        g_refs.append(g_ref)
    cos = {k: float(np.mean([r[k] for r in cos_rows])) for k in cos_rows[0]}
    imp = {k: float(np.mean([r[k] for r in imp_rows])) for k in imp_rows[0]} if imp_rows else {}
    coherence = [eqt_diag.self_coherence(a, b) for a, b in zip(g_rule, g_rule[1:], strict=False)]
    result["extras"].update({"self_coherence_groups": _group_coherence(g_rule),
                             "self_coherence_groups_ref": _group_coherence(g_refs)})
    free = model.free_phase(batches[0][0])
    x0, y0 = batches[0]
    # 8 rows keep the abscissa's power iteration cheap
    finger = eqt_diag.fingerprint(model, x0[:8], y0[:8], trainer.rule, batches[1:])
    result["metrics"].update({
        "cos_bptt": cos["cos/global"], "norm_ratio": cos["norm_ratio"],
        "self_coherence": float(np.mean(coherence)), "residual": free.residual,
        "settle_iters": float(free.steps), "abscissa": finger["abscissa"],
        **{k: v for k, v in cos.items() if k.startswith("cos/")},
        "implicit_batches": float(len(imp_rows)),
        **({"cos_implicit": imp["cos/global"], "norm_ratio_implicit": imp["norm_ratio"],
            "cos_bptt_implicit": imp["bptt"],
            **{"cos_implicit/" + k[4:]: v for k, v in imp.items()
               if k.startswith("cos/") and k != "cos/global"}} if imp else {})})
    result["fingerprint"] = finger
    result["extras"].update({"self_coherence": coherence, "residual_curve": free.trace,
                             "cos_per_batch": cos_rows, "cos_implicit_per_batch": imp_rows,
                             "lambda": None if trainer.controller is None
                             else trainer.controller.lam})


def _group_coherence(grads: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean batch-to-batch cosine per parameter group (health: estimator sign by group)."""
    pairs = [eqt_diag.grad_cosines(a, b) for a, b in zip(grads, grads[1:], strict=False)]
    return {k[len("cos/"):]: float(np.mean([p[k] for p in pairs]))
            for k in pairs[0] if k.startswith("cos/")} if pairs else {}


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
