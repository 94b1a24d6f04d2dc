"""The equilibrium rows of ``eqt_lm`` (``bptt`` and ``ep``, METHODS §2): the equilibrium LM of
``models.eqt`` (one block relaxed to a fixed point) trained with the rule's gradient, the jacreg
controller in the loop; their calibration (the free phase's eps/T1) and the gradient-quality and
operator diagnostics.

A row module of the study gives three calls: ``build`` (model, learning rule, held-out loss),
``calibrate`` and ``diagnose`` (what the row adds to the study's common diagnosis).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config.eqt import (
    BPTTRule,
    EPRule,
    EqRule,
    LMModelConfig,
    RelaxConfig,
    StabiliserConfig,
)
from models.context import RunContext
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
from models.studies.eqt_lm.common import EVAL_SEED, LossFn, check_init_loss, lm_baselines, val_loss
from models.training.segments import progress_bar
from models.training.trainer import LearningRule, Trainer
from models.training.windows import Windows


def eq_model(model_cfg: LMModelConfig, rule: EqRule, relax: RelaxConfig,
             vocab_size: int) -> EquilibriumLM:
    if model_cfg.n_layer != 1:
        raise ValueError(f"the equilibrium LM has one block; set model.n_layer=1 for row kind "
                         f"{rule.kind!r} (got {model_cfg.n_layer})")
    b = rule.block
    return EquilibriumLM(EqShape(
        vocab_size=vocab_size, block_size=model_cfg.block_size, n_embd=model_cfg.n_embd,
        n_head=model_cfg.n_head, qk_norm=model_cfg.qk_norm, damping=b.damping, block=b.kind,
        emb_std=b.emb_std, init_std=b.init_std, resinit=b.resinit), relax)


def build(model_cfg: LMModelConfig, rule_cfg: EqRule, relax: RelaxConfig | None,
          vocab_size: int, device: torch.device) -> tuple[nn.Module, Equilibrium, Any]:
    """The equilibrium LM under the calibrated ``relax`` (else the row's own), its rule, and its
    held-out loss through the free phase."""
    model = eq_model(model_cfg, rule_cfg, relax or rule_cfg.relax, vocab_size).to(device)
    rule = Equilibrium(model, rule_cfg)
    return model, rule, rule.loss


def calibrate(trainer: Trainer, ctx: RunContext, study_name: str) -> dict[str, Any]:
    """The free phase's eps/T1 (``models.eqt.calibration``; eps halved until the relaxation
    converges at init) and the initial loss vs ln V."""
    model, rule = trainer.model, trainer.rule
    assert isinstance(model, EquilibriumLM) and isinstance(rule, Equilibrium)
    # 8 windows per batch: enough to see divergence, cheap for the abscissa's power iteration
    batches = [trainer.batches.next(0)[0][:8] for _ in range(3)]
    result = calibrate_relax(model, batches, search=True)
    # the initial loss under the chosen relaxation, eagerly on a copy: the trainer stays as
    # built (a fast engine would have captured the uncalibrated relaxation)
    calibrated = copy.deepcopy(model)
    calibrated.relax_cfg = RelaxConfig(**result["relax"])
    ln_v = math.log(ctx.tokens.vocab_size)
    init_loss = val_loss(calibrated.loss, ctx.tokens.val, model.shape.block_size,
                         trainer.cfg, 4, ctx.device)
    check_init_loss(init_loss, ln_v)
    return {**result, "ln_vocab": ln_v, "init_val_loss": init_loss,
            "init_over_ln_vocab": init_loss / ln_v, "health": lm_baselines(ctx.tokens, init_loss)}


class Equilibrium(LearningRule):
    """A ``bptt`` or ``ep`` row (METHODS §2): the rule's gradient on the equilibrium LM with its
    stabilisers and the jacreg controller in the loop (``models.eqt.step.gradients``, or the
    fast GPU step of ``models.eqt.fast`` when asked for and available); every ``cos_every``
    steps of an EP row, first the cosine of its task gradient to BPTT's on the step's batch.

    The jacreg probe draws from the global torch RNG, which the segment driver checkpoints, and
    the controller's (lambda, res EMA) is the rule's state, so resumed runs are bit-exact.
    """

    def __init__(self, model: EquilibriumLM, cfg: EqRule) -> None:
        self.cfg = cfg
        self.controller = JacregController.from_config(cfg.stab) if cfg.stab.controller else None
        self.fast: FastEQ | None = None
        if cfg.fast.enabled and FastEQ.supports(cfg) and cfg.block.kind == "thick":
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
            g_t1, _ = fast.gradients(x, y, BPTTRule(stab=plain))
            if free is None:
                free = fast.free_phase(x)
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


def diagnose(trainer: Trainer, ctx: RunContext, result: dict[str, Any],
             n_batches: int = 4) -> None:
    """cos(g_rule, g_BPTT) per group and global and k = |g_rule|/|g_BPTT| (task gradients, mean
    over held-out batches), batch-to-batch self-coherence, the free-phase residual and one
    relaxation's residual curve, the numerical abscissa and the 4-number fingerprint."""
    model, rule = trainer.model, trainer.rule
    assert isinstance(model, EquilibriumLM) and isinstance(rule, Equilibrium)
    stream = Windows(ctx.tokens.val, model.shape.block_size, trainer.cfg.batch_size,
                     EVAL_SEED + 2, ctx.device)
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


