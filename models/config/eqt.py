"""Params of the language-model study ``eqt_lm``: the transformer shape and the three rules
(BP transformer, BPTT and EP on the equilibrium block).

These classes are also what the library takes (``models.eqt`` imports them): one class per
concept, with its defaults and validators here only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from models.config.base import Strict, StudyConfig, check_rows, merge_checked
from models.config.train import TrainConfig


class LMModelConfig(Strict):
    n_embd: Annotated[int, Field(gt=0)] = 64
    n_head: Annotated[int, Field(gt=0)] = 4
    n_layer: Annotated[int, Field(gt=0)] = 1
    block_size: Annotated[int, Field(gt=1)] = 64
    qk_norm: bool = False

    @model_validator(mode="after")
    def _heads(self) -> LMModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        return self


class RelaxConfig(Strict):
    """Free phase of the equilibrium block (``models.eqt.relax``); log 003's recipe: eps 0.1,
    T1 150, then continue in chunks until the residual is at most ``res_target`` or ``t1max``."""

    eps: Annotated[float, Field(gt=0)] = 0.1
    t1: Annotated[int, Field(ge=1)] = 150
    t1max: Annotated[int, Field(ge=1)] = 300
    res_target: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    chunk: Annotated[int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _order(self) -> RelaxConfig:
        if self.t1max < self.t1:
            raise ValueError(f"t1max={self.t1max} must be >= t1={self.t1}")
        return self


class StabiliserConfig(Strict):
    """Stabilisers (``models.eqt.stabilisers``). With ``controller`` on, lambda starts at ``lam``
    and follows the residual, clipped to [floor, lam_max]; the floor must stay > 0 (log 003: two
    lambda -> 0 runs exploded while res read 0). With it off, ``jacreg`` is a fixed lambda.
    ``resreg``: weight of the residual penalty R (0 = off); ``gate``: free-phase residual above
    which the task gradient is skipped (None = no gate). ``control``: the residual the controller
    follows, ``final`` (after the adaptive continuation) or ``t1`` (after exactly T1 steps: what
    evaluation and the BPTT unroll see; it keeps the dynamics contracting fast enough for a
    T1-step unroll and a T2-step nudge, see ``models.eqt.ep``). ``adjoint_target`` (EP rows
    with ``adaptive_t2``; None = off): lambda also rises while the nudged phase's estimated
    remaining change after t2_max (``models.eqt.ep.remaining_change``) is above it, so that the
    adjoint, not only the forward pass, contracts (``models.eqt.stabilisers.JacregController``).
    ``adjoint_gate`` (EP rows with ``t2_tol``; None = off): the validity gate of the nudged
    phase. A nudged phase that ends with its estimated remaining change of a above it (relative
    to |a|) did not settle, and its contrast is no estimate of the adjoint: the task gradient
    is skipped as for the free gate (reports/gpu-short 4884326: at step 350 the nudged phase ran
    to its 800-step cap with a remaining change of 15x |a|, and the best snapshot's contrast
    was applied)."""

    controller: bool = True
    lam: Annotated[float, Field(gt=0)] = 0.1
    floor: Annotated[float, Field(gt=0)] = 0.1
    lam_max: Annotated[float, Field(gt=0)] = 16.0
    target: Annotated[float, Field(gt=0)] = 1.5e-3
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.9
    power: Annotated[float, Field(gt=0)] = 0.3
    jacreg: Annotated[float, Field(ge=0)] = 0.0
    resreg: Annotated[float, Field(ge=0)] = 0.0
    gate: Annotated[float, Field(gt=0)] | None = None
    control: Literal["final", "t1"] = "final"
    adjoint_target: Annotated[float, Field(gt=0)] | None = None
    adjoint_gate: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _range(self) -> StabiliserConfig:
        if not self.floor <= self.lam_max:
            raise ValueError(f"floor={self.floor} must not exceed lam_max={self.lam_max}")
        return self


class EqBlockConfig(Strict):
    """The equilibrium block and its initialisation (``models.eqt.model.EqShape``)."""

    kind: Literal["thick", "conservative"] = "thick"
    damping: Annotated[float, Field(ge=0)] = 1.0
    emb_std: Annotated[float, Field(gt=0)] = 1.0
    init_std: Annotated[float, Field(gt=0)] = 0.02
    resinit: Annotated[float, Field(gt=0)] = 1.0


class NudgeConfig(Strict):
    """The EP estimator (``models.eqt.ep``). Defaults follow log 003's canonical recipe
    (``--T2 20 --track``): centered +-beta nudging for T2 steps; ``holomorphic_n`` >= 2 puts N
    points on the circle of radius ``holomorphic_r`` (N = 2 is the real centered contrast at
    beta = r, the recipe's ``--holo 2 --hr 0.02``); AEP correction none | fixed | tracking.
    ``adaptive_t2`` runs to ``t2_max`` and keeps the snapshot (taken every ``snapshot_every``
    steps) with the smallest increment of a (``--t2sel``). ``t2_tol`` (off by default) makes that
    horizon adaptive: a nudged phase whose estimated remaining change of a (the geometric tail
    of its snapshot increments, ``models.eqt.ep.remaining_change``, relative to |a|) is still
    above ``t2_tol`` after ``t2_max`` steps continues in chunks of five snapshots until it is
    below or ``t2_cap`` steps ran (the free phase's continue-until-res_target, applied to the
    adjoint: when the controller lags, contraction slows and a fixed t2_max truncates it).
    ``nudge_scale``: ``token`` (default) nudges every token's own loss with beta (the summed
    loss), ``mean`` the batch-mean loss, whose per-element nudge ~beta/(B T) falls below fp32
    resolution of z at the log's shape (``models.eqt.ep``). ``accel: anderson`` mixes each
    nudged step with the last ``accel_m`` ones (``models.eqt.anderson``): the same relaxation
    and stopping rule in fewer steps where contraction is slow (real phases only)."""

    beta: Annotated[float, Field(gt=0)] = 0.02
    t2: Annotated[int, Field(ge=1)] = 20
    aep: Literal["none", "fixed", "tracking"] = "tracking"
    holomorphic_n: Annotated[int, Field(ge=0)] = 0
    holomorphic_r: Annotated[float, Field(gt=0)] = 0.02
    adaptive_t2: bool = False
    t2_max: Annotated[int, Field(ge=1)] = 80
    snapshot_every: Annotated[int, Field(ge=1)] = 4
    t2_tol: Annotated[float, Field(gt=0)] | None = None
    t2_cap: Annotated[int, Field(ge=1)] = 300
    nudge_scale: Literal["token", "mean"] = "token"
    accel: Literal["none", "anderson"] = "none"
    accel_m: Annotated[int, Field(ge=1, le=32)] = 5

    @model_validator(mode="after")
    def _holo(self) -> NudgeConfig:
        if self.holomorphic_n == 1:
            raise ValueError("holomorphic_n=1 has no centered contrast; use 0 (real +-beta) or >= 2")
        if self.accel == "anderson" and self.holomorphic_n > 2:
            raise ValueError(f"accel: anderson mixes real nudged phases; holomorphic_n="
                             f"{self.holomorphic_n} has complex ones (use holomorphic_n <= 2 or "
                             "accel: none)")
        if self.adaptive_t2 and self.t2_max < 2 * self.snapshot_every:
            raise ValueError(f"adaptive_t2 needs t2_max >= 2 * snapshot_every (got t2_max="
                             f"{self.t2_max}, snapshot_every={self.snapshot_every})")
        if self.t2_tol is not None:
            if not self.adaptive_t2:
                raise ValueError("t2_tol extends the adaptive T2 horizon; set adaptive_t2: true")
            chunk = self.t2_chunk
            if (self.t2_max % self.snapshot_every or self.t2_cap < self.t2_max
                    or (self.t2_cap - self.t2_max) % chunk):
                raise ValueError(f"t2_tol needs t2_max a multiple of snapshot_every and t2_cap = "
                                 f"t2_max + a multiple of 5 * snapshot_every = {chunk} (got "
                                 f"t2_max={self.t2_max}, snapshot_every={self.snapshot_every}, "
                                 f"t2_cap={self.t2_cap})")
        return self

    @property
    def t2_chunk(self) -> int:
        """Steps per continuation chunk past t2_max (five snapshots)."""
        return 5 * self.snapshot_every

    @property
    def t2_steps(self) -> int:
        """Nudged steps before any continuation."""
        return self.t2_max if self.adaptive_t2 else self.t2


class FastConfig(Strict):
    """The fast step of ``models.eqt.fast`` (CUDA graphs + torch.compile on a GPU). Without CUDA
    ``enabled`` runs the same functions eagerly (no graphs, no compile): the closed-form
    jvp/vjp and the differential nudge make an EP step ~2x cheaper than the eager rules on the
    CPU (BPTT's is not: ~110 vs 90 ms at the CPU default's shape). ``bf16``:
    autocast where the estimator tolerates it; ``tf32``: TF32 matmuls outside the nudged forces;
    ``nudge``: tracking-AEP in ``differential`` (common/differential-mode, one vjp per step) or
    ``lockstep`` form (the eager loop, captured); ``bptt_attention``: BPTT's backward steps by
    autograd through fused (``sdpa``) or explicit-softmax (``materialized``) attention, or in
    closed form (``closed``, ``ThickOps.backward``: no autograd, compiled as one step)."""

    enabled: bool = False
    graphs: bool = True
    compile: bool = True
    bf16: bool = False
    tf32: bool = True
    nudge: Literal["differential", "lockstep"] = "differential"
    bptt_attention: Literal["sdpa", "materialized", "closed"] = "sdpa"


class BPRule(Strict):
    """Backprop through a standard pre-LN transformer (the baseline row)."""

    kind: Literal["bp"] = "bp"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}


class _EqRuleBase(Strict):
    """What every rule on the equilibrium block shares: the block, its free phase, stabilisers."""

    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    block: EqBlockConfig = EqBlockConfig()
    relax: RelaxConfig = RelaxConfig()
    stab: StabiliserConfig = StabiliserConfig()
    fast: FastConfig = FastConfig()


class BPTTRule(_EqRuleBase):
    """Backprop through the T1-step unroll of the equilibrium block (the exact-gradient control)."""

    kind: Literal["bptt"] = "bptt"

    @model_validator(mode="after")
    def _no_adjoint_control(self) -> BPTTRule:
        for key in ("adjoint_target", "adjoint_gate"):
            if getattr(self.stab, key) is not None:
                raise ValueError(f"stab.{key} reads EP's nudged phase; a bptt row has none "
                                 "(allowed: null)")
        return self


class EPRule(_EqRuleBase):
    """Equilibrium propagation on the equilibrium block. ``cos_every``: steps between training-time
    measurements of cos(g_EP, g_BPTT) on the training batch (0 = off; each costs one EP and one
    BPTT gradient)."""

    kind: Literal["ep"] = "ep"
    nudge: NudgeConfig = NudgeConfig()
    fast: FastConfig = FastConfig()
    cos_every: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _adjoint_control_needs_snapshots(self) -> EPRule:
        n = self.nudge
        if self.stab.adjoint_target is not None and not (
                n.adaptive_t2 and n.t2_max >= 3 * n.snapshot_every):
            raise ValueError("stab.adjoint_target reads the nudged phase's rate, measured from "
                             "two snapshot increments by t2_max: set nudge.adaptive_t2: true and "
                             f"nudge.t2_max >= 3 * snapshot_every = {3 * n.snapshot_every} (got "
                             f"adaptive_t2={n.adaptive_t2}, t2_max={n.t2_max}), or "
                             "stab.adjoint_target: null")
        if self.stab.adjoint_gate is not None and (n.t2_tol is None or not n.adaptive_t2):
            raise ValueError("stab.adjoint_gate judges the nudged phase by its estimated "
                             "remaining change, measured with nudge.adaptive_t2: true and "
                             f"nudge.t2_tol set (got adaptive_t2={n.adaptive_t2}, "
                             f"t2_tol={n.t2_tol}), or stab.adjoint_gate: null")
        return self


LMRule = Annotated[BPRule | BPTTRule | EPRule, Field(discriminator="kind")]
EqRule = BPTTRule | EPRule


class LMStudyConfig(StudyConfig):
    """A language-modelling study: rows are learning rules, each trained on every seed."""

    model: LMModelConfig = LMModelConfig()
    train: TrainConfig = TrainConfig()
    rules: dict[str, LMRule]

    @model_validator(mode="after")
    def _rows_known(self) -> LMStudyConfig:
        check_rows(self.rows, self.rules)
        for name, rule in self.rules.items():
            merge_checked(self.train, rule.train, f"rules.{name}.train")
            merge_checked(self.model, rule.model, f"rules.{name}.model")
        return self

    def row_train(self, row: str) -> TrainConfig:
        return merge_checked(self.train, self.rules[row].train, f"rules.{row}.train")

    def row_model(self, row: str) -> LMModelConfig:
        return merge_checked(self.model, self.rules[row].model, f"rules.{row}.model")

    def row_rule(self, row: str) -> BPRule | BPTTRule | EPRule:
        return self.rules[row]
