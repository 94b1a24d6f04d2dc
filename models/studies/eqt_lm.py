"""The ``eqt-lm`` study: language modelling on the token corpus, one row per learning rule.

Rows share data, tokenizer, evaluation windows and model shape (n_embd, n_head, block_size). The
``bp`` row trains a standard pre-LN transformer (``models.nets.transformer``); ``bptt`` and ``ep``
rows train the equilibrium LM of ``models.eqt`` (one block relaxed to a fixed point) with the
gradient of the rule (METHODS §2, ``Equilibrium``), the jacreg controller in the loop. Every row
trains with the one trainer (``models.training.trainer``: AdamW, EMA, clipping, statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from models.data.tokens import load_codec, read_tokens
from models.eqt import bptt as eqt_bptt
from models.eqt import diagnostics as eqt_diag
from models.eqt import ep as eqt_ep
from models.eqt import implicit as eqt_implicit
from models.eqt.calibration import calibrate as calibrate_relax
from models.eqt.fast import FastEQ
from models.eqt.model import EqShape, EquilibriumLM
from models.eqt.relax import RelaxResult
from models.eqt.stabilisers import JacregController
from models.eqt.step import gradients
from models.nets.transformer import TransformerLM, TransformerShape, attention_off
from models.pipeline import RunSpec, tokens_dir
from models.studies import baselines
from models.training import rng
from models.training.segments import progress_bar
from models.training.trainer import Backprop, LearningRule, Trainer
from models.training.windows import Windows

EVAL_SEED = 10_000  # the same validation windows for every row and seed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def vocab_size() -> int:
    return int(io.read_json(tokens_dir() / "meta.json")["vocab_size"])


def val_tokens() -> np.ndarray:
    return read_tokens(tokens_dir() / "val.bin")


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


def eq_model(model_cfg: LMModelConfig, rule: EqRule, relax: RelaxConfig) -> EquilibriumLM:
    if model_cfg.n_layer != 1:
        raise ValueError(f"the equilibrium LM has one block; set model.n_layer=1 for row kind "
                         f"{rule.kind!r} (got {model_cfg.n_layer})")
    b = rule.block
    return EquilibriumLM(EqShape(
        vocab_size=vocab_size(), block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
        n_head=model_cfg.n_head, qk_norm=model_cfg.qk_norm, damping=b.damping, block=b.kind,
        emb_std=b.emb_std, init_std=b.init_std, resinit=b.resinit), relax)


class Equilibrium(LearningRule):
    """A ``bptt`` or ``ep`` row (METHODS §2): the rule's gradient on the equilibrium LM with its
    stabilisers and the jacreg controller in the loop (``models.eqt.step.gradients``, or the
    fast GPU step of ``models.eqt.fast`` when asked for and available); every ``cos_every``
    steps of an EP row, first the cosine of its task gradient to BPTT's on the step's batch.

    The jacreg probe draws from the global torch RNG, which the segment driver checkpoints, and
    the controller's (lambda, res EMA) is the rule's state, so resumed runs are bit-exact.
    """

    def __init__(self, model: EquilibriumLM, cfg: EqRule, device: torch.device) -> None:
        self.cfg = cfg
        self.controller = JacregController.from_config(cfg.stab) if cfg.stab.controller else None
        self.fast: FastEQ | None = None
        if (cfg.fast.enabled and device.type == "cuda" and FastEQ.supports(cfg)
                and cfg.block.kind == "thick"):
            self.fast = FastEQ(model, cfg.fast)
        self.fast_eval: FastEQ | None = None  # the EMA copy's engine (its graphs read its weights)
        self._last_x: torch.Tensor | None = None

    @property
    def cos_every(self) -> int:
        return self.cfg.cos_every if isinstance(self.cfg, EPRule) else 0

    def grads(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int,
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        assert isinstance(model, EquilibriumLM)
        x, y = batch
        stats: dict[str, float] = {}
        if self.cos_every and (step + 1) % self.cos_every == 0:
            stats.update(self.task_cosines(model, x, y))
        if self.fast is not None:
            grads, rule_stats = self.fast.gradients(x, y, self.cfg, self.controller)
        else:
            grads, rule_stats = gradients(model, x, y, self.cfg, self.controller)
        stats.update(rule_stats)
        if isinstance(self.cfg, EPRule):  # the free phase behind residual/settle_iters
            stats["settle/free/tol"] = model.relax_cfg.res_target
            stats["settle/free/cap"] = float(model.relax_cfg.t1max)
        if self.controller is not None:
            stats["lambda"] = self.controller.lam  # after this step's update (what the next uses)
        self._last_x = x
        return grads, stats

    def task_cosines(self, model: EquilibriumLM, x: torch.Tensor, y: torch.Tensor,
                     ) -> dict[str, float]:
        """cos(g_rule, g_BPTT) per group and global on one batch: the rule's task gradient (no
        stabilisers) at the current weights, against ``reference_cosines``' references."""
        if not isinstance(self.cfg, EPRule):
            raise TypeError(f"task cosines need an EP row, not {self.cfg.kind!r}")
        plain = StabiliserConfig(controller=False)
        if self._fast_for(model) is not None:
            assert self.fast is not None
            g, stats = self.fast.gradients(x, y, EPRule(nudge=self.cfg.nudge, stab=plain))
            g = {n: t.clone() for n, t in g.items()}
            free = None
        else:
            free = model.free_phase(x)
            g, stats = eqt_ep.ep_gradients(model, x, y, self.cfg.nudge, free)
        refs = self.references(model, x, y, free)
        return {**reference_cosines(g, refs), "cos_t2": stats.get("t2", math.nan)}

    def _fast_for(self, model: EquilibriumLM) -> FastEQ | None:
        return self.fast if self.fast is not None and self.fast.model is model else None

    def references(self, model: EquilibriumLM, x: torch.Tensor, y: torch.Tensor,
                   free: RelaxResult | None = None) -> dict[str, Any]:
        """The exact gradients ``reference_cosines`` compares with, on one batch: ``t1`` (BPTT,
        T1 steps), ``implicit`` (None without a converged free phase or adjoint), ``bptt`` (the
        converged unroll of ``steps`` steps; its limit, the implicit gradient, with ``steps`` 0
        where that unroll would exceed 10 t1max; the T1 one when there is no implicit gradient
        or z* is unstable) and ``unstable`` (1 when z* is not contractive under the free phase's
        own iteration, NaN when the adjoint was not tried).

        At an unstable z* no unroll converges: BPTT through more steps grows without limit, so
        the BPTT gradient there is the T1 one, and the implicit gradient (still logged) is the
        gradient of an equilibrium the relaxation cannot hold. On the step-500 weights of the
        GPU protocol scaled until z* is unstable (CPU, 8 sequences at full width), EP was at cos
        1.0000 to the T1 unroll and 0.9896 (attn.q 0.77) to the implicit gradient, the T1 unroll
        itself 0.9898 to it."""
        fast = self._fast_for(model)
        plain = StabiliserConfig(controller=False)
        if fast is not None:  # the eager BPTT needs ~28 GB at the log's shape
            if free is not None:  # may view the engine's z buffer, which the BPTT graph rewrites
                free.z = free.z.clone()
            g_t1, _ = fast.gradients(x, y, BPTTRule(stab=plain))
            g_t1 = {n: t.clone() for n, t in g_t1.items()}
            if free is None:
                free = fast.free_phase(x)
                free.z = free.z.clone()
        else:
            g_t1, _, _ = eqt_bptt.bptt_gradients(model, x, y)
            free = free if free is not None else model.free_phase(x)
        g_ref, steps = g_t1, model.relax_cfg.t1
        g_imp, imp_stats = eqt_implicit.reference_gradients(model, x, y, free)
        if g_imp is not None and "adjoint_iters" in imp_stats:
            steps = eqt_bptt.reference_steps(free.steps, float(imp_stats["adjoint_iters"]),
                                             cap=free.steps + 10 * model.relax_cfg.t1max)
            g_ref = (fast.bptt_reference(x, y, steps)[0] if fast is not None
                     else eqt_bptt.bptt_gradients(model, x, y, steps)[0])
        elif g_imp is not None and not imp_stats["adjoint_unstable"]:
            g_ref, steps = g_imp, 0  # slower than 10 t1max damped steps: the unroll's limit
        return {"t1": g_t1, "implicit": g_imp, "bptt": g_ref, "steps": float(steps),
                "unstable": float(imp_stats.get("adjoint_unstable", math.nan))}

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        """Activation RMS of x_in and of z* on the last training batch at the updated weights
        (one extra no-grad free phase)."""
        assert isinstance(model, EquilibriumLM)
        if self._last_x is None:
            return {}
        with torch.no_grad():
            x_in = model.x_in(self._last_x)
            z = (self.fast.free_phase(self._last_x) if self.fast is not None
                 else model.free_phase(self._last_x)).z
        return {"act/x_in": x_in.pow(2).mean().sqrt().item(),
                "act/z_star": z.pow(2).mean().sqrt().item()}

    def loss(self, model: EquilibriumLM) -> LossFn:
        """Held-out CE through ``model``'s free phase (the trained model or its EMA copy), on
        the fast path when training uses it."""
        if self.fast is None:
            return model.loss
        if model is self.fast.model:
            return self.fast.loss
        if self.fast_eval is None:
            self.fast_eval = FastEQ(model, self.cfg.fast)
        return self.fast_eval.loss

    def state_dict(self) -> dict[str, Any]:
        return {"controller": None if self.controller is None else self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


def reference_cosines(g: dict[str, torch.Tensor], refs: dict[str, Any]) -> dict[str, float]:
    """Cosines of ``g`` to the exact gradients of ``Equilibrium.references`` (same weights and
    batch).

    ``cos/*``: to BPTT through an unroll converged in both passes (``eqt_bptt.
    reference_steps``: the free phase's steps plus the implicit adjoint's iterations, logged as
    ``cos_ref_steps``; 0 = the implicit gradient, the unroll's limit, where that unroll would
    exceed 10 t1max steps), the gradient of the equilibrium model that EP estimates.
    ``cos_t1/*``: to BPTT through exactly T1 steps, the BPTT row's own gradient; it truncates
    the backward pass when contraction is slow even where the forward residual is below
    res_target (reports/gpu-short: 0.845 to the implicit gradient at one checkpoint).
    ``cos_implicit/*``: to the implicit gradient at the same z*; ``cos_bptt_implicit`` and
    ``cos_bptt_t1_implicit``: each reference's own cosine to it. Without a converged free phase
    (no implicit gradient) the reference is the T1-step BPTT and ``cos_ref_steps`` = T1 says so.
    ``cos_ref_unstable``: 1 where the damped adjoint iteration grew, i.e. z* is not a stable
    fixed point of the free phase (its small residual after T1 steps notwithstanding); no unroll
    converges there, and the reference is the T1 one (``cos_ref_steps`` = T1).
    """
    out = {"cos_ref_steps": refs["steps"], "cos_ref_unstable": refs["unstable"]}
    for prefix, key in (("cos_t1", "t1"), ("cos_implicit", "implicit")):
        if refs[key] is not None:
            c = eqt_diag.grad_cosines(g, refs[key])
            out.update({f"{prefix}/{k[4:]}": v for k, v in c.items() if k.startswith("cos/")})
            out[f"norm_ratio_{key}"] = c["norm_ratio"]
    if refs["implicit"] is not None:
        out["cos_bptt_implicit"] = eqt_diag.cosine(refs["bptt"], refs["implicit"])
        out["cos_bptt_t1_implicit"] = eqt_diag.cosine(refs["t1"], refs["implicit"])
    out.update(eqt_diag.grad_cosines(g, refs["bptt"]))
    return out


@torch.no_grad()
def val_loss(loss: LossFn, block_size: int, cfg: TrainConfig, batches: int,
             device: torch.device) -> float:
    """Mean held-out CE on the validation windows every row and seed share."""
    windows = Windows(val_tokens(), block_size, cfg.batch_size, EVAL_SEED, device)
    return float(np.mean([float(loss(*windows.next())) for _ in range(batches)]))


def build(study: LMStudyConfig, row: str, seed: int, relax: RelaxConfig | None,
          device: torch.device) -> Trainer:
    """A row's model and rule (BP transformer, or the equilibrium LM under the calibrated
    ``relax``, else the row's own), its training windows and its evaluation."""
    rule_cfg = study.rules[row]
    model_cfg, train_cfg = study.row_model(row), study.row_train(row)
    rng.seed_everything(seed)
    model: nn.Module
    rule: LearningRule
    if isinstance(rule_cfg, BPRule):
        model = TransformerLM(TransformerShape(
            vocab_size=vocab_size(), block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
            n_head=model_cfg.n_head, n_layer=model_cfg.n_layer, qk_norm=model_cfg.qk_norm,
        )).to(device)
        rule, loss_of = Backprop(lm_objective), transformer_loss
    else:
        model = eq_model(model_cfg, rule_cfg, relax or rule_cfg.relax).to(device)
        rule = eq_rule = Equilibrium(model, rule_cfg, device)
        loss_of = eq_rule.loss  # type: ignore[assignment]
    batches = Windows(read_tokens(tokens_dir() / "train.bin"), model_cfg.block_size,
                      train_cfg.batch_size, seed, device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_loss": val_loss(loss_of(m), model_cfg.block_size, train_cfg,
                                     train_cfg.eval_batches, device)}

    return Trainer(model, rule, batches, evaluate, train_cfg)


class EqtLMStudy:
    name = "eqt_lm"
    title = "eqt-lm: language modelling, BP transformer vs equilibrium propagation"
    columns = (("best_val_loss", "best val CE"), ("final_val_loss", "final val CE"),
               ("context_gain", "CE gain from attention"), ("residual", "final residual"),
               ("cos_bptt", "cos to BPTT"), ("cos_implicit", "cos to implicit"),
               ("ms_per_step", "ms/step"), ("peak_mem_mb", "peak MB"))
    plots = (("val_loss", "validation cross-entropy"), ("loss", "training loss"),
             ("cos/global", "cos(g_rule, g_BPTT) during training"))

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      device: torch.device) -> Trainer:
        relax = RelaxConfig(**calibration["relax"]) if "relax" in calibration else None
        return build(params.study_as(spec.study, LMStudyConfig), spec.row, spec.seed, relax,
                     device)

    def calibrate(self, params: Params, row: str, device: torch.device) -> dict[str, Any]:
        """BP: initial loss vs ln V, activation RMS, a short LR probe. Equilibrium rows: the
        free phase's eps/T1 (``models.eqt.calibration``; eps halved until the relaxation
        converges at init) and the initial loss vs ln V."""
        study = params.study_as(self.name, LMStudyConfig)
        train_cfg = study.row_train(row)
        trainer = build(study, row, 0, None, device)
        if isinstance(trainer.rule, Equilibrium):
            return self._calibrate_eq(trainer, device)
        ln_v = math.log(vocab_size())
        init_loss = val_loss(transformer_loss(trainer.model), study.row_model(row).block_size,
                             train_cfg, 4, device)
        x, _ = trainer.batches.next(0)
        with torch.no_grad():
            act = [s.pow(2).mean().sqrt().item() for s in trainer.model.hidden_states(x)]  # type: ignore[operator]
        probe_steps = 20
        losses = [trainer.train_step(s, train_cfg.lr)["loss"] for s in range(probe_steps)]
        result = {
            "ln_vocab": ln_v, "init_val_loss": init_loss, "init_over_ln_vocab": init_loss / ln_v,
            "act_rms": act, "lr_probe": {"lr": train_cfg.lr, "steps": probe_steps,
                                         "first_loss": losses[0], "last_loss": losses[-1]},
            "health": _lm_baselines(init_loss),
        }
        _check_init_loss(init_loss, ln_v)
        if not math.isfinite(losses[-1]) or losses[-1] > losses[0]:
            raise ValueError(f"calibration: loss rose from {losses[0]:.3f} to {losses[-1]:.3f} in "
                             f"{probe_steps} steps at lr={train_cfg.lr}; lower "
                             f"studies.{self.name}.train.lr")
        return result

    @staticmethod
    def _calibrate_eq(trainer: Trainer, device: torch.device) -> dict[str, Any]:
        model, rule = trainer.model, trainer.rule
        assert isinstance(model, EquilibriumLM) and isinstance(rule, Equilibrium)
        # 8 windows per batch: enough to see divergence, cheap for the abscissa's power iteration
        batches = [trainer.batches.next(0)[0][:8] for _ in range(3)]
        result = calibrate_relax(model, batches, search=True)
        model.relax_cfg = RelaxConfig(**result["relax"])
        ln_v = math.log(vocab_size())
        init_loss = val_loss(rule.loss(model), model.shape.block_size, trainer.cfg, 4, device)
        _check_init_loss(init_loss, ln_v)
        return {**result, "ln_vocab": ln_v, "init_val_loss": init_loss,
                "init_over_ln_vocab": init_loss / ln_v, "health": _lm_baselines(init_loss)}

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer,
                 device: torch.device) -> dict[str, Any]:
        """Held-out CE on more windows than during training, entropy, samples, and the CE with
        attention off (``val_loss_no_attention``; ``context_gain`` = it minus the CE on the same
        windows: what context adds, ~0 for a model that predicts from the current token alone);
        for equilibrium rows also the gradient-quality and operator diagnostics of METHODS §2."""
        codec = load_codec(tokens_dir() / "tokenizer.json")
        model = trainer.ema.averaged(trainer.model).eval()
        stream = Windows(val_tokens(), model.shape.block_size, trainer.cfg.batch_size,  # type: ignore[arg-type]
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
        if isinstance(trainer.rule, Equilibrium):
            _diagnose_eq(trainer, device, result)
        return result


def _lm_baselines(init_loss: float) -> dict[str, Any]:
    """What every row must beat (models.studies.baselines): ln V, unigram, untrained net."""
    return baselines.language_model(read_tokens(tokens_dir() / "train.bin"), val_tokens(),
                                     vocab_size(), init_loss)


def _check_init_loss(init_loss: float, ln_v: float) -> None:
    if abs(init_loss / ln_v - 1) > 0.1:
        raise ValueError(f"calibration: initial val loss {init_loss:.3f} is not within 10% of "
                         f"ln V = {ln_v:.3f}; the initialisation is off")


def _diagnose_eq(trainer: Trainer, device: torch.device, result: dict[str, Any],
                 n_batches: int = 4) -> None:
    """cos(g_rule, g_BPTT) per group and global and k = |g_rule|/|g_BPTT| (task gradients, mean
    over held-out batches), batch-to-batch self-coherence, the free-phase residual and one
    relaxation's residual curve, the numerical abscissa and the 4-number fingerprint."""
    model, rule = trainer.model, trainer.rule
    assert isinstance(model, EquilibriumLM) and isinstance(rule, Equilibrium)
    stream = Windows(val_tokens(), model.shape.block_size, trainer.cfg.batch_size,
                     EVAL_SEED + 2, device)
    batches = [stream.next() for _ in range(n_batches)]
    cos_rows, g_rule, g_refs = [], [], []
    with progress_bar() as bar:  # minutes per batch on a CPU at a GPU run's shape
        for x, y in bar.track(batches, description="diagnose: held-out batches"):
            relaxed = model.free_phase(x)
            refs = rule.references(model, x, y, relaxed)
            t2 = 0.0
            if isinstance(rule.cfg, EPRule):
                g, ep_stats = eqt_ep.ep_gradients(model, x, y, rule.cfg.nudge, relaxed)
                t2 = ep_stats["t2"]
            else:  # the BPTT row's own gradient: the T1-step unroll
                g = refs["t1"]
            # against the converged unroll (cos/*), the T1 one (cos_t1/*) and the implicit one
            cos_rows.append({**reference_cosines(g, refs), "t2": t2,
                             "free_steps": float(relaxed.steps),
                             "residual_t1": relaxed.residual_t1})
            g_rule.append(g)
            g_refs.append(refs["bptt"])
    coherence = [eqt_diag.self_coherence(a, b) for a, b in zip(g_rule, g_rule[1:], strict=False)]
    result["extras"].update({"self_coherence_groups": _group_coherence(g_rule),
                             "self_coherence_groups_ref": _group_coherence(g_refs)})
    free = model.free_phase(batches[0][0])
    x0, y0 = batches[0]
    # 8 rows keep the abscissa's power iteration cheap
    finger = eqt_diag.fingerprint(model, x0[:8], y0[:8], rule.cfg, batches[1:])
    result["metrics"].update({
        **held_out_cosines(cos_rows),
        "self_coherence": float(np.mean(coherence)), "residual": free.residual,
        "settle_iters": float(free.steps), "abscissa": finger["abscissa"]})
    result["fingerprint"] = finger
    # per held-out batch, so a mean can be audited (None: not measured, e.g. no adjoint tried)
    result["batches"] = [{k: None if math.isnan(v) else v for k, v in r.items()}
                         for r in cos_rows]
    result["extras"].update({"self_coherence": coherence, "residual_curve": free.trace,
                             "lambda": None if rule.controller is None
                             else rule.controller.lam})


def held_out_cosines(cos_rows: list[dict[str, float]]) -> dict[str, float]:
    """diagnose's metrics from the per-batch ``reference_cosines`` rows: means over the batches
    of ``cos/*``, ``cos_t1/*``, ``cos_ref_steps`` and ``norm_ratio`` (``cos_bptt`` = ``cos/global``).

    ``cos/*`` compares with each batch's reference, which at an unstable z* is the T1 unroll (the
    BPTT row's own gradient there, so its cosine is 1). ``cos_implicit*``, ``cos_bptt_*`` and
    ``norm_ratio_implicit`` average those of the ``implicit_batches`` (batches with an implicit
    gradient) whose z* is stable, where it is the converged unroll's limit; ``unstable_batches``
    (of ``diagnose_batches``) counts the unstable ones, with the rule's cosine to the implicit
    gradient there as ``cos_implicit_unstable`` (health: unstable_equilibrium). At ff7c04e, which
    averaged them in, EP's 4-batch cos to implicit was 0.842 with one batch unstable, while it was
    at 0.997 to BPTT."""
    implicit_keys = ("cos_implicit", "cos_bptt_", "norm_ratio_implicit")
    cos = {k: float(np.mean([r[k] for r in cos_rows])) for k in cos_rows[0]
           if k.startswith(("cos/", "cos_t1/")) or k in ("cos_ref_steps", "norm_ratio")}
    implicit = [r for r in cos_rows if "cos_implicit/global" in r]
    stable = [r for r in implicit if r["cos_ref_unstable"] != 1]
    unstable = [r["cos_implicit/global"] for r in implicit if r["cos_ref_unstable"] == 1]
    imp = {k: float(np.mean([r[k] for r in stable])) for k in stable[0]
           if k.startswith(implicit_keys)} if stable else {}
    if imp:
        imp["cos_implicit"] = imp.pop("cos_implicit/global")
    return {**cos, "cos_bptt": cos["cos/global"], **imp,
            "implicit_batches": float(len(implicit)), "diagnose_batches": float(len(cos_rows)),
            "unstable_batches": float(np.nansum([r["cos_ref_unstable"] for r in cos_rows])),
            **({"cos_implicit_unstable": float(np.mean(unstable))} if unstable else {})}


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
