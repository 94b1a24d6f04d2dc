"""Params of the sequence-model studies ``pc_seq`` (predictive-coding hierarchy, log 001) and
``dtp_wm`` (latent world model trained by difference target propagation, log 000).

These classes are what ``models.seq`` takes: one class per concept, defaults and validators here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from models.config.base import Strict
from models.config.rows import RowStudyConfig


class PrecisionConfig(Strict):
    """Learned per-layer precision pi = floor + softplus(r) (``models.seq.precision``).

    ``lr``: SGD step on the Gaussian free energy (0 freezes pi at ``init``); ``floor`` keeps a
    layer from muting its own errors (log 001); ``damping`` kappa pulls r towards a slow EMA
    r_bar (``ema``), the damping term that stopped log 000's late precision resonance."""

    init: Annotated[float, Field(gt=0)] = 1.0
    floor: Annotated[float, Field(gt=0)] = 0.1
    lr: Annotated[float, Field(ge=0)] = 1e-2
    damping: Annotated[float, Field(ge=0)] = 1.0
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.99

    @model_validator(mode="after")
    def _floor(self) -> PrecisionConfig:
        if self.init <= self.floor:
            raise ValueError(f"init={self.init} must exceed floor={self.floor}")
        return self


class SettleConfig(Strict):
    """Settling (inference) of the PC hierarchy: Nesterov-accelerated gradient descent on the
    energy with step ``step`` / tau_l (tau_l the top curvature of the layer's diagonal Hessian
    block; the whole Hessian is at most twice that, so ``step`` < 2/3 keeps the accelerated
    iteration stable; calibration halves it if settling at init does not lower the energy)
    until the curvature-scaled drift ||dE/dh / tau|| is at most ``tol`` ||h||, or ``max_iters``
    (always, while the noise kicks are above that). ``noise``: Langevin noise std at step 0,
    multiplied by 0.5 every ``noise_half_life`` steps (log 001: noise injection, gradually
    reduced)."""

    step: Annotated[float, Field(gt=0, lt=1)] = 0.5
    tol: Annotated[float, Field(gt=0, lt=1)] = 3e-4
    max_iters: Annotated[int, Field(ge=1)] = 80
    noise: Annotated[float, Field(ge=0)] = 1e-3
    noise_half_life: Annotated[int, Field(gt=0)] = 50


class LayerRateConfig(Strict):
    """Per-layer learning-rate adaptation (log 001: faster layers slowed, slower ones sped up):
    gain_l <- clip(gain_l * (median rate / rate_l)^power, lo, hi), rate_l an EMA (``ema``) of
    the relative update size |dtheta_l| / |theta_l|. ``power`` 0 turns it off."""

    power: Annotated[float, Field(ge=0, le=1)] = 0.05
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.9
    lo: Annotated[float, Field(gt=0)] = 0.25
    hi: Annotated[float, Field(gt=0)] = 4.0

    @model_validator(mode="after")
    def _range(self) -> LayerRateConfig:
        if self.lo > 1 or self.hi < 1:
            raise ValueError(f"need lo <= 1 <= hi (got lo={self.lo}, hi={self.hi})")
        return self


class PCModelConfig(Strict):
    """The hierarchy: ``context`` token embeddings of size ``n_embd`` (concatenated) on top,
    ``depth`` hidden layers of ``width``, the next token at the bottom (a softmax readout)."""

    context: Annotated[int, Field(ge=1)] = 8
    n_embd: Annotated[int, Field(gt=0)] = 16
    width: Annotated[int, Field(gt=0)] = 128
    depth: Annotated[int, Field(ge=1)] = 3
    act: Literal["tanh", "gelu"] = "tanh"


class PCRule(Strict):
    """Predictive coding: settle, then local updates from the settled precision-weighted errors.
    ``beta``: weight of the clamped output (CE) term in the energy."""

    kind: Literal["pc"] = "pc"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    beta: Annotated[float, Field(gt=0)] = 1.0
    settle: SettleConfig = SettleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    layer_rate: LayerRateConfig = LayerRateConfig()


class SeqBPRule(Strict):
    """The BP-trained twin: the same net and optimiser, exact gradients by autograd."""

    kind: Literal["bp"] = "bp"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}


PCSeqRule = Annotated[PCRule | SeqBPRule, Field(discriminator="kind")]


class PCSeqConfig(RowStudyConfig):
    """``pc_seq``: next-token prediction by a predictive-coding hierarchy vs its BP twin."""

    model: PCModelConfig = PCModelConfig()
    rules: dict[str, PCSeqRule]

    @model_validator(mode="after")
    def _rows_known(self) -> PCSeqConfig:
        self._check()
        return self


class WorldModelConfig(Strict):
    """The RSSM-style world model: a deterministic recurrent state of ``slots`` x ``slot_dim``
    (leaky tanh cell, ``leak``), a Gaussian latent of ``latent`` dims with prior p(z|h) and
    posterior q(z|h, e(x)), a one-hidden-layer token decoder of ``dec_hidden`` units on [h, z];
    trained on windows of ``block_size`` tokens. The objective per token is CE + ``kl_weight`` *
    KL(q || p); ``eval_samples`` prior samples per position give the held-out predictive CE
    (log-mean-exp over them). Both are part of the model so that they are part of every run's
    identity."""

    block_size: Annotated[int, Field(gt=1)] = 32
    n_embd: Annotated[int, Field(gt=0)] = 32
    slots: Annotated[int, Field(ge=1)] = 16
    slot_dim: Annotated[int, Field(ge=1)] = 8
    latent: Annotated[int, Field(ge=1)] = 16
    dec_hidden: Annotated[int, Field(gt=0)] = 128
    leak: Annotated[float, Field(gt=0, le=1)] = 0.5
    kl_weight: Annotated[float, Field(ge=0)] = 1.0
    eval_samples: Annotated[int, Field(ge=1)] = 8


class InverseConfig(Strict):
    """Learned inverses g (residual + LayerNorm, ``hidden`` units), trained by difference
    reconstruction on inputs perturbed by N(0, ``noise``^2) with Adam at ``lr``, ``steps`` per
    training step; ``pretrain_steps`` at calibration before the target norms are measured."""

    hidden: Annotated[int, Field(gt=0)] = 128
    noise: Annotated[float, Field(gt=0)] = 0.1
    lr: Annotated[float, Field(gt=0)] = 1e-3
    steps: Annotated[int, Field(ge=1)] = 1
    pretrain_steps: Annotated[int, Field(ge=0)] = 100


class DTPRule(Strict):
    """DTP through layers and time. ``eta``: top target step on the per-token output gradient;
    ``time_gain``: factor on the difference a state target sends one step back in time (None =
    calibrated so the earliest state's target norm stays within 2x of the top's); ``keep_norm``:
    each target hop keeps the norm of the difference it came from (``models.seq.dtp``)."""

    kind: Literal["dtp"] = "dtp"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    eta: Annotated[float, Field(gt=0)] = 0.5
    time_gain: Annotated[float, Field(gt=0, le=1)] | None = None
    keep_norm: bool = True
    inverse: InverseConfig = InverseConfig()
    precision: PrecisionConfig = PrecisionConfig(lr=1e-2)


DTPWMRule = Annotated[DTPRule | SeqBPRule, Field(discriminator="kind")]


class DTPWMConfig(RowStudyConfig):
    """``dtp_wm``: the latent world model trained by DTP vs its BPTT twin."""

    model: WorldModelConfig = WorldModelConfig()
    rules: dict[str, DTPWMRule]

    @model_validator(mode="after")
    def _rows_known(self) -> DTPWMConfig:
        self._check()
        return self
